"""Progress of a running analysis for people: tiles done of total and the time left.

Reads the :class:`~histolens.result.Provenance` of a partial result. The estimate scales
the time spent so far by the model-input pixels still to run (``timings["planned_input_px"]``
against ``timings["model_input_px"]``, both set by :func:`histolens.inference.analyze`):
the first model input is small (the tile at the centre alone), later ones are blocks, so
counting tiles would overestimate the rest. Pure Python, no Qt.
"""

from __future__ import annotations

from typing import Any

__all__ = ["progress_text", "seconds_left"]


def seconds_left(provenance: Any) -> float | None:
    """Estimated seconds until the run ends, or None before the first model input finished."""
    t = provenance.timings or {}
    planned = float(t.get("planned_input_px", 0.0))
    done = float(t.get("model_input_px", 0.0))
    elapsed = float(provenance.seconds or 0.0)
    if planned <= 0 or done <= 0 or elapsed <= 0:
        return None
    return max(0.0, elapsed * (planned - done) / done)


def progress_text(provenance: Any) -> str:
    """``"12 / 25 tiles, about 4 s left"`` (the estimate once one model input is done)."""
    text = f"{provenance.tiles_done} / {provenance.tiles_total} tiles"
    left = seconds_left(provenance)
    if left is None or provenance.tiles_done >= provenance.tiles_total:
        return text
    if left < 1.0:
        return f"{text}, under 1 s left"
    if left < 90:
        return f"{text}, about {left:.0f} s left"
    return f"{text}, about {left / 60:.0f} min left"
