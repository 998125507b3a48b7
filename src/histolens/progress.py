"""Progress of a running analysis for people: tiles done of total and the time left.

:class:`ProgressPrinter` is the one printer of the command-line jobs (``histolens analyze``,
``histolens demo``): a bar on a terminal, timestamped lines in a log.
:func:`progress_text` is the dock's one-line status; it reads the
:class:`~histolens.result.Provenance` of a partial result. The estimate scales
the time spent so far by the model-input pixels still to run (``timings["planned_input_px"]``
against ``timings["model_input_px"]``, both set by :func:`histolens.inference.analyze`):
the first model input is small (the tile at the centre alone), later ones are blocks, so
counting tiles would overestimate the rest. Pure Python, no Qt.
"""

from __future__ import annotations

import shutil
import sys
import time
from datetime import datetime
from typing import Any

__all__ = ["ProgressPrinter", "progress_text", "seconds_left"]


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


class ProgressPrinter:
    """Tiles done of ``total`` for a person watching a command: a tqdm bar on a terminal,
    plain timestamped lines (at most one every ``every`` s, and the last) in a log.

    :meth:`log` prints a message above the bar (or as a line); ``enabled=False`` prints nothing.
    """

    def __init__(
        self, total: int = 0, *, stream: Any = None, every: float = 10.0, enabled: bool = True
    ) -> None:
        self.stream = stream or sys.stderr
        self.total, self.done, self.every = int(total), 0, every
        self.enabled = enabled
        self._t0 = self._last = time.perf_counter()
        self._bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            # A pseudo-terminal may report a 0 x 0 size, and tqdm then draws nothing at all.
            size = shutil.get_terminal_size((0, 0))
            sized = size.columns > 0 and size.lines > 0
            self._bar = tqdm(
                total=self.total, unit="tile", file=self.stream, dynamic_ncols=sized,
                ncols=None if sized else 100, nrows=None if sized else 20,
            )  # fmt: skip

    def set_total(self, total: int) -> None:
        """The number of tiles to expect, once known (it may be revised as a run goes on).

        The rate is timed from the first call made before any tile is done, so the time spent
        planning is left out but a revised total does not restart the clock."""
        self.total = int(total)
        if self.done == 0:
            self._t0 = time.perf_counter()
        if self._bar is not None:
            self._bar.reset(total=self.total)
            self._bar.update(self.done)

    def log(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            stamp = datetime.now().strftime("%H:%M:%S")
            print(f"{stamp} histolens: {text}", file=self.stream, flush=True)

    def update(self, n: int, label: str = "") -> None:
        """``n`` more tiles done; ``label`` (e.g. the slide's name) is shown beside the count."""
        self.done += n
        if self._bar is not None:
            if label:
                self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(n)
            return
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.every or self.done >= self.total):
            self._last = now
            rate = self.done / max(now - self._t0, 1e-9)
            self.log(f"tiles {self.done}/{self.total} ({rate:.1f} tiles/s) {label}".rstrip())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
