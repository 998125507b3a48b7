"""Masks as images on the slide: OME-TIFF (one level) and OME-Zarr (a multiscale pyramid).

Each mask is an array at ``downsample`` level-0 px per pixel whose pixel ``(0, 0)`` starts at
level-0 ``origin = (y0, x0)``: nuclei labels, tile classes (integers, marked as label images)
and attention heat maps (float32 in [0, 1]). Physical placement uses the level-0 pixel size
``mpp`` (um); without one, coordinates stay in level-0 pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histolens.region import layer_transform

from ._atomic import atomic_path

if TYPE_CHECKING:
    from histolens.result import RegionResult

__all__ = ["Mask", "mask_pyramid", "result_masks", "save_ome_tiff", "save_ome_zarr"]

#: The pyramid is halved until its longest side is at most this many pixels.
PYRAMID_TOP_PX = 256
_CHUNK_PX = 1024


@dataclass(frozen=True)
class Mask:
    """One mask to write: file stem, array, level-0 px per pixel, level-0 origin, title."""

    stem: str
    array: np.ndarray
    downsample: float
    origin: tuple[float, float]
    name: str

    @property
    def is_labels(self) -> bool:
        return bool(np.issubdtype(self.array.dtype, np.integer))


def _smallest_uint(array: np.ndarray) -> np.ndarray:
    top = int(array.max()) if array.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return array.astype(dtype, copy=False)
    return array.astype(np.uint64, copy=False)


def result_masks(result: RegionResult) -> list[Mask]:
    """The masks a result has: nuclei labels, tile classes, one heat map per attention scale."""
    masks: list[Mask] = []
    nuc, tiles = result.nuclei, result.tiles
    if nuc is not None:
        labels = _smallest_uint(np.asarray(nuc.labels))
        masks.append(Mask("nuclei_labels", labels, nuc.downsample, tuple(nuc.origin), "nuclei"))
    if tiles is not None:
        classes = _smallest_uint(np.asarray(tiles.classes).clip(min=0))
        masks.append(Mask("tile_classes", classes, tiles.cell, tuple(tiles.origin), "tile classes"))
    for att in result.attention:
        heat = np.asarray(att.heat, dtype=np.float32)
        masks.append(Mask(f"attention_s{att.scale}", heat, att.downsample, att.origin, att.name))
    return masks


# --------------------------------------------------------------------------- OME-TIFF
def save_ome_tiff(path: Path, mask: Mask, mpp: float | None) -> Path:
    """``mask`` as a one-level OME-TIFF; PhysicalSize ``mpp * downsample`` um, Plane position
    the level-0 edge of pixel (0, 0) in um."""
    import tifffile

    metadata: dict[str, Any] = {"axes": "YX", "Name": mask.name}
    if mpp is not None:
        pixel_um = float(mpp) * float(mask.downsample)
        metadata.update(
            PhysicalSizeX=pixel_um,
            PhysicalSizeXUnit="µm",
            PhysicalSizeY=pixel_um,
            PhysicalSizeYUnit="µm",
        )
        metadata["Plane"] = {
            "PositionY": [float(mpp) * float(mask.origin[0])],
            "PositionX": [float(mpp) * float(mask.origin[1])],
            "PositionYUnit": ["µm"],
            "PositionXUnit": ["µm"],
        }
    array = mask.array
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp,
            array,
            ome=True,
            bigtiff=array.nbytes > 2**31,
            photometric="minisblack",
            tile=(256, 256) if min(array.shape) >= 256 else None,
            compression="zlib",
            metadata=metadata,
        )
    return path


# --------------------------------------------------------------------------- OME-Zarr
def _halve(array: np.ndarray) -> np.ndarray:
    """One pyramid step: each 2 x 2 block -> one pixel (an odd edge is repeated).

    Labels take the block's most frequent value (ties and all-different blocks: the top-left
    one, i.e. nearest), so no label is invented by averaging; images take the block mean.
    """
    h, w = array.shape
    # Only an odd side is padded: np.pad copies, and a whole slide's labels are gigabytes.
    padded = np.pad(array, ((0, h % 2), (0, w % 2)), mode="edge") if h % 2 or w % 2 else array
    tl, tr = padded[0::2, 0::2], padded[0::2, 1::2]
    bl, br = padded[1::2, 0::2], padded[1::2, 1::2]
    if not np.issubdtype(array.dtype, np.integer):
        return ((tl + tr + bl + br) / 4).astype(array.dtype)
    out = np.where(bl == br, bl, tl)
    out = np.where((tr == bl) | (tr == br), tr, out)
    return np.where((tl == tr) | (tl == bl) | (tl == br), tl, out)


def mask_pyramid(array: np.ndarray, top_px: int = PYRAMID_TOP_PX) -> list[np.ndarray]:
    """``array`` and its 2x reductions (see :func:`_halve`) until the longest side is at most
    ``top_px``; level ``k`` pixels are ``2**k`` level-0-array pixels wide."""
    levels = [np.asarray(array)]
    while max(levels[-1].shape) > top_px and min(levels[-1].shape) > 1:
        levels.append(_halve(levels[-1]))
    return levels


def zarr_transforms(mask: Mask, mpp: float | None, n_levels: int) -> list[list[dict[str, Any]]]:
    """NGFF ``coordinateTransformations`` per level: scale ``mpp * downsample * 2**k`` and the
    translation of pixel (0, 0)'s centre, both from :func:`histolens.region.layer_transform`
    (so a viewer lays every level on the slide exactly like the napari layer of the array).
    Without ``mpp`` the units are level-0 pixels."""
    world = float(mpp) if mpp else 1.0
    out = []
    for k in range(n_levels):
        scale, translate = layer_transform(world, float(mask.downsample) * 2**k, mask.origin)
        out.append(
            [
                {"type": "scale", "scale": list(scale)},
                {"type": "translation", "translation": list(translate)},
            ]
        )
    return out


def save_ome_zarr(path: Path, mask: Mask, mpp: float | None) -> Path:
    """``mask`` as an OME-NGFF 0.5 (zarr v3) multiscale pyramid written by ome-zarr-py.

    Level ``k`` sits at the path ome-zarr-py gives it (``datasets[k]["path"]`` in the
    metadata, ``"s<k>"``); integer masks are marked ``image-label`` (viewers colour them as
    labels). Transforms: :func:`zarr_transforms`.
    """
    import zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_multiscale

    pyramid = mask_pyramid(mask.array)
    unit = {"unit": "micrometer"} if mpp else {}
    axes = [{"name": a, "type": "space", **unit} for a in ("y", "x")]
    chunks = [{"chunks": _chunks(level.shape)} for level in pyramid]
    with atomic_path(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        write_multiscale(
            pyramid,
            group,
            fmt=FormatV05(),
            axes=axes,
            coordinate_transformations=zarr_transforms(mask, mpp, len(pyramid)),
            storage_options=chunks,
            name=mask.name,
        )
        if mask.is_labels:
            group.attrs["ome"] = {**group.attrs["ome"], "image-label": {"version": "0.5"}}
    return path


def _chunks(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(min(_CHUNK_PX, max(int(n), 1)) for n in shape)
