"""Colours as ``[r, g, b]`` integers 0..255, the form QuPath's classifications carry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["class_color_map", "parse_color"]


def parse_color(
    color: str | Sequence[float] | None, default: Sequence[int] = (128, 128, 128)
) -> list[int]:
    """``[r, g, b]`` integers 0..255 from ``"#rrggbb"``, a CSS name or an RGB(A) sequence.

    Sequences of floats all <= 1 are taken as 0..1 (napari's convention), others as 0..255.
    """
    if color is None:
        return [int(v) for v in default][:3]
    if isinstance(color, str):
        from PIL import ImageColor

        try:
            rgb = ImageColor.getrgb(color)
        except ValueError:
            msg = f"colour {color!r} is neither '#rrggbb' nor a CSS colour name"
            raise ValueError(msg) from None
        return [int(v) for v in rgb[:3]]
    values = [float(v) for v in color][:3]
    if len(values) != 3:
        msg = f"colour {color!r} needs three components (r, g, b)"
        raise ValueError(msg)
    if all(v <= 1.0 for v in values):
        values = [v * 255.0 for v in values]
    return [int(round(min(max(v, 0.0), 255.0))) for v in values]


def class_color_map(names: Sequence[str], colors: Sequence[Any]) -> dict[str, list[int]]:
    """``{class name: [r, g, b]}``; classes beyond ``colors`` get the default grey."""
    return {
        str(n): parse_color(colors[i] if i < len(colors) else None) for i, n in enumerate(names)
    }
