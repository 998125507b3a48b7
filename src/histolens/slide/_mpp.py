"""Pixel size (micrometres per level-0 pixel) from vendor metadata: pure parsing functions.

Each parser returns ``float | None`` (um/px) and never raises on malformed metadata: a slide
with unreadable calibration still opens, and :func:`histolens.slide.open_slide` warns.
"""

from __future__ import annotations

import math
import re
from xml.etree import ElementTree

__all__ = [
    "aperio_properties",
    "mpp_from_aperio",
    "mpp_from_ome",
    "mpp_from_philips",
    "mpp_from_resolution",
    "mpp_from_ventana",
    "plausible_mpp",
]

#: micrometres per unit, for OME ``PhysicalSizeXUnit`` values.
_UM_PER_UNIT = {
    "pm": 1e-6, "nm": 1e-3, "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0,
    "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4, "angstrom": 1e-4, "in": 25400.0,
}  # fmt: skip


def plausible_mpp(value: float | None) -> float | None:
    """``value`` if it is a believable microscope pixel size (0.01..50 um/px), else ``None``.

    Guards against TIFF defaults such as 72 dpi (352.8 um/px) being taken as a calibration.
    """
    if value is None or not math.isfinite(value) or not (0.01 <= value <= 50.0):
        return None
    return float(value)


def aperio_properties(description: str) -> dict[str, str]:
    """``key = value`` pairs of an Aperio ``ImageDescription`` (``"...|MPP = 0.499|..."``)."""
    props: dict[str, str] = {}
    for part in description.split("|")[1:]:
        key, sep, value = part.partition("=")
        if sep:
            props[key.strip()] = value.strip()
    return props


def mpp_from_aperio(description: str) -> float | None:
    """Aperio ``MPP`` (um/px) from the SVS ``ImageDescription``."""
    try:
        return plausible_mpp(float(aperio_properties(description)["MPP"]))
    except (KeyError, ValueError):
        return None


def mpp_from_ome(ome_xml: str, image: int = 0) -> float | None:
    """OME ``Pixels@PhysicalSizeX`` (+ ``PhysicalSizeXUnit``, default um) of image ``image``."""
    try:
        root = ElementTree.fromstring(ome_xml)
    except ElementTree.ParseError:
        return None
    pixels = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"]
    if not pixels:
        return None
    px = pixels[min(image, len(pixels) - 1)]
    sizes = []
    for axis in ("X", "Y"):
        raw = px.get(f"PhysicalSize{axis}")
        if raw is None:
            continue
        unit = px.get(f"PhysicalSize{axis}Unit", "µm")
        try:
            sizes.append(float(raw) * _UM_PER_UNIT[unit])
        except (KeyError, ValueError):
            return None
    # Slides have square pixels; X is the convention when Y is missing.
    return plausible_mpp(sizes[0]) if sizes else None


def mpp_from_resolution(xres: tuple[int, int] | float | None, unit: int | None) -> float | None:
    """um/px from TIFF ``XResolution`` (pixels per unit) and ``ResolutionUnit`` (2 inch, 3 cm).

    Unit 1 (none) carries no physical size, so it gives ``None``.
    """
    if xres is None or unit not in (2, 3):
        return None
    try:
        ppu = xres[0] / xres[1] if isinstance(xres, tuple) else float(xres)
    except (ZeroDivisionError, TypeError, IndexError):
        return None
    if not (ppu > 0):
        return None
    um_per_unit = 25400.0 if unit == 2 else 1e4
    return plausible_mpp(um_per_unit / ppu)


def mpp_from_philips(description: str) -> float | None:
    """Philips TIFF ``DICOM_PIXEL_SPACING`` (mm, row then column) of the first (level-0) entry."""
    match = re.search(r'Name="DICOM_PIXEL_SPACING"[^>]*>\s*&quot;([\d.eE+-]+)&quot;', description)
    if match is None:
        match = re.search(r'Name="DICOM_PIXEL_SPACING"[^>]*>\s*"([\d.eE+-]+)"', description)
    if match is None:
        return None
    try:
        return plausible_mpp(float(match.group(1)) * 1000.0)
    except ValueError:
        return None


def mpp_from_ventana(xmp: str) -> float | None:
    """Ventana BIF ``ScanRes`` (um/px) from the ``iScan`` element of the XMP tag."""
    match = re.search(r'ScanRes\s*=\s*"([\d.eE+-]+)"', xmp)
    if match is None:
        return None
    try:
        return plausible_mpp(float(match.group(1)))
    except ValueError:
        return None
