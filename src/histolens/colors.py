"""Colour conversions, in one place for the whole package.

:func:`parse_color` gives ``[r, g, b]`` integers 0..255 (the form QuPath's classifications
carry), :func:`to_hex` ``"#rrggbb"`` (the form results and the dock carry) and :func:`rgba`
floats in [0, 1] (the form napari colormaps take).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["class_color_map", "parse_color", "rgba", "to_hex"]


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


def class_color_map(
    names: Sequence[str], colors: Sequence[Any] | Mapping[str, Any]
) -> dict[str, list[int]]:
    """``{class name: [r, g, b]}``; classes beyond ``colors`` get the default grey.

    ``colors`` is one colour per name, in order, or a ``{name: colour}`` mapping (then
    ``names`` is not used).
    """
    if isinstance(colors, Mapping):
        return {str(k): parse_color(v) for k, v in colors.items()}
    return {
        str(n): parse_color(colors[i] if i < len(colors) else None) for i, n in enumerate(names)
    }


def to_hex(color: str | Sequence[float]) -> str:
    """``#rrggbb`` from a hex string (kept as given, ``#`` added when missing) or an
    ``(r, g, b)`` sequence read as :func:`parse_color` reads it."""
    if isinstance(color, str):
        return color if color.startswith("#") else f"#{color}"
    r, g, b = parse_color(color)
    return f"#{r:02x}{g:02x}{b:02x}"


def rgba(color: Any, alpha: float = 1.0) -> tuple[float, float, float, float]:
    """RGBA floats in [0, 1] from ``'#rrggbb[aa]'``, ``(r, g, b[, a])`` in 0..255 or 0..1."""
    if isinstance(color, str):
        h = color.lstrip("#")
        if len(h) not in (6, 8) or any(c not in "0123456789abcdefABCDEF" for c in h):
            msg = (
                f"colour {color!r} is not '#rrggbb' or '#rrggbbaa'; give hex or an (r, g, b) tuple"
            )
            raise ValueError(msg)
        vals = [int(h[i : i + 2], 16) / 255.0 for i in range(0, len(h), 2)]
    else:
        vals = [float(v) for v in color]
        if len(vals) not in (3, 4):
            msg = f"colour {color!r} needs 3 or 4 components"
            raise ValueError(msg)
        if max(vals) > 1.0:  # 0..255 integers
            vals = [v / 255.0 for v in vals]
    if len(vals) == 3:
        vals.append(alpha)
    r, g, b, a = vals
    return (r, g, b, a)
