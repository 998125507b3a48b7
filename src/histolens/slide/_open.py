"""``open_slide``: check the path, pick a backend from the file's first bytes, build a Slide."""

from __future__ import annotations

import math
import os
import warnings
import weakref
from pathlib import Path
from typing import Any

from ._derive import derive_levels
from ._slide import Slide, SlideError, _check_mpp

__all__ = ["SLIDE_SUFFIXES", "open_slide", "slide_name"]

#: File name endings the reader claims (lower case). TIFF-based ones are sniffed by content.
SLIDE_SUFFIXES = (
    ".svs", ".ndpi", ".tif", ".tiff", ".scn", ".bif", ".dcm", ".mrxs", ".vms", ".vmu",
    ".svslide",
)  # fmt: skip
#: Formats only OpenSlide reads (not TIFF containers).
_OPENSLIDE_ONLY = (".mrxs", ".vms", ".vmu", ".svslide")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def slide_name(path: Path) -> str:
    """Display name: the file name without its slide suffix (``a.ome.tif`` -> ``a``)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix else name


def _sniff(path: Path) -> str:
    """Backend for ``path``: ``"tiff"``, ``"dicom"``, ``"dicom-folder"`` or ``"openslide"``."""
    if path.is_dir():
        if any(p.suffix.lower() == ".dcm" for p in path.iterdir() if p.is_file()):
            return "dicom-folder"
        raise SlideError(
            path,
            "it is a folder, not a slide file, and holds no DICOM (.dcm) instances",
            "open the slide file itself (for MIRAX, the .mrxs file beside this folder), "
            "or a folder of DICOM whole-slide instances",
        )
    size = path.stat().st_size
    if size == 0:
        raise SlideError(path, "the file is empty (0 bytes)", "copy or download the slide again")
    with open(path, "rb") as fh:
        head = fh.read(132)
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    if path.suffix.lower() in _OPENSLIDE_ONLY:
        return "openslide"
    try:
        from ._openslide import import_openslide

        if import_openslide().OpenSlide.detect_format(str(path)):
            return "openslide"
    except ImportError:
        pass
    raise SlideError(
        path,
        f"it is not a whole-slide image: neither TIFF nor DICOM (it starts with {head[:8]!r})",
        "open an SVS, NDPI, OME-TIFF, SCN, BIF, Philips or tiled TIFF, a DICOM WSI, or "
        "(with `pip install napari-histolens[openslide]`) MRXS/VMS",
    )


def _open_backend(path: Path, kind: str) -> dict[str, Any]:
    if kind == "tiff":
        from ._tiff import open_tiff

        return open_tiff(path)
    if kind in ("dicom", "dicom-folder"):
        from ._dicom import open_dicom

        return open_dicom(path)
    from ._openslide import open_openslide

    try:
        return open_openslide(path)
    except ImportError:
        raise
    except Exception as exc:  # openslide.OpenSlideError and friends
        raise SlideError(
            path, f"OpenSlide cannot read it ({exc})", "check that the file is complete"
        ) from None


def _open_parts(path: Path) -> dict[str, Any]:
    """The backend's Slide keyword arguments; any failure is a :class:`SlideError`.

    The backends check what they know can go wrong; this is the net under them, so that a
    damaged file never reaches the user as a bare TypeError or ZeroDivisionError.
    """
    try:
        parts = _open_backend(path, _sniff(path))
    except (SlideError, ImportError):
        raise
    except Exception as exc:  # tifffile, pydicom, wsidicom, codecs: many types on damage
        raise SlideError(
            path,
            f"it cannot be read as a slide ({type(exc).__name__}: {exc})",
            "the file is damaged or not a supported slide; copy it again, or convert it to a "
            "tiled pyramidal TIFF",
        ) from exc
    mpp = parts.get("mpp")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        warnings.warn(
            f"{path}: the file records an impossible pixel size ({mpp} um/px); it is ignored",
            UserWarning,
            stacklevel=3,
        )
        parts["mpp"], parts["mpp_source"] = None, "none"
    return parts


def open_slide(path: str | os.PathLike[str], *, mpp: float | None = None) -> Slide:
    """Open a whole-slide image as a :class:`Slide` of lazy levels (nothing is decoded yet
    except one tile, to fail early on a bad file).

    Parameters
    ----------
    path : a slide file (SVS, NDPI, OME-TIFF, SCN, BIF, Philips TIFF, tiled TIFF, DICOM,
        and with the ``openslide`` extra MRXS/VMS/...) or a folder of DICOM instances.
    mpp : micrometres per level-0 pixel; overrides the file's value (``mpp_source="user"``).

    Raises
    ------
    SlideError : the file is missing, empty, a plain folder, not a slide, truncated, or its
        tiles cannot be decoded; the message names the file and the fix.
    ImportError : the format needs OpenSlide and it is not installed.
    """
    path = Path(os.fspath(path)).expanduser()
    user_mpp = _check_mpp(mpp, "open_slide(mpp=...)")
    if not path.exists():
        raise SlideError(
            path, "no such file or folder", "check the path (and the working directory)"
        )
    parts = _open_parts(path)
    closers = parts.pop("closers", ())
    derive = parts.pop("derive", False)
    levels, downsamples = parts["levels"], parts["downsamples"]
    if len(levels) == 1 or derive:
        # One stored level (e.g. CMU-1-Small-Region.svs): add lazy coarser levels so napari
        # draws the whole slide from a small level instead of decoding every tile.
        levels, downsamples = derive_levels(levels[0])
        parts["levels"], parts["downsamples"] = levels, downsamples
    if user_mpp is not None:
        parts["mpp"], parts["mpp_source"] = user_mpp, "user"
    elif parts["mpp"] is None:
        parts["mpp_source"] = "none"
        warnings.warn(
            f"{path}: the file records no pixel size (mpp), so lengths and model resolution "
            "are unknown; pass it with open_slide(path, mpp=0.25) or `--mpp` on the command line",
            UserWarning,
            stacklevel=2,
        )
    slide = Slide(
        **parts,
        path=path,
        name=slide_name(path),
        _closers=tuple(closers),
        _reopen=(str(path),),
    )
    # Close the file when the last reference goes, for users who never call close().
    for closer in closers:
        weakref.finalize(slide, closer)
    return slide
