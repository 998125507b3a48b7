"""Large synthetic pyramidal TIFFs for tests and benchmarks, written without holding the image.

Real multi-gigapixel slides cannot live in the repository, so tests and benchmarks build one:
a few distinct JPEG tiles (pale "stroma" with purple disk "nuclei") are encoded once and
their bytes are repeated in a fixed pattern over every level. Writing 65,536 x 65,536 px takes
seconds and little memory, and the expected pixels of any region are known exactly.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SyntheticPyramid", "write_synthetic_pyramid"]


@dataclass(frozen=True)
class SyntheticPyramid:
    """What :func:`write_synthetic_pyramid` wrote: ``path``, level shapes (pixels), ``tile``,
    ``mpp`` (um/px) and the decoded variant tiles that make up every level."""

    path: Path
    level_shapes: tuple[tuple[int, int], ...]
    tile: int
    mpp: float
    variants: np.ndarray  # (n, tile, tile, 3) uint8, as tifffile decodes them

    @staticmethod
    def variant_index(ty: int, tx: int, n: int) -> int:
        """Which variant sits at tile row ``ty``, column ``tx`` (same rule on every level)."""
        return (ty * 5 + tx * 3) % n

    def expected(self, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """The exact pixels of box ``[y0, y1) x [x0, x1)`` of ``level`` (that level's pixels)."""
        t, n = self.tile, len(self.variants)
        out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        for ty in range(y0 // t, -(-y1 // t)):
            for tx in range(x0 // t, -(-x1 // t)):
                v = self.variants[self.variant_index(ty, tx, n)]
                sy0, sx0 = max(y0, ty * t), max(x0, tx * t)
                sy1, sx1 = min(y1, (ty + 1) * t), min(x1, (tx + 1) * t)
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = v[
                    sy0 - ty * t : sy1 - ty * t, sx0 - tx * t : sx1 - tx * t
                ]
        return out


def _variant_pixels(n: int, tile: int, seed: int) -> np.ndarray:
    """``n`` H&E-like tiles: pink ground, darker fibres, purple disks (flat: small JPEGs)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:tile, 0:tile]
    tiles = np.empty((n, tile, tile, 3), dtype=np.uint8)
    for k in range(n):
        img = np.empty((tile, tile, 3), dtype=np.uint8)
        img[:] = (236, 200, 222)
        band = (np.abs(((yy + xx * (k % 3 + 1)) % 97) - 48) < 3) & (rng.random() < 0.9)
        img[band] = (214, 150, 190)
        for _ in range(int(rng.integers(8, 24))):
            cy, cx = rng.integers(0, tile, size=2)
            r = int(rng.integers(4, 12))
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (92, 50, 140)
        tiles[k] = img
    return tiles


def _encode_variants(pixels: np.ndarray, tile: int, quality: int) -> tuple[list[bytes], np.ndarray]:
    """JPEG bytes of each variant exactly as tifffile encodes a tile, and tifffile's decoding."""
    import tifffile

    n = len(pixels)
    strip = np.concatenate(list(pixels), axis=1)  # one tile high, n tiles wide
    buf = io.BytesIO()
    tifffile.imwrite(
        buf, strip, tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
        photometric="rgb", metadata=None,
    )  # fmt: skip
    raw = buf.getvalue()
    with tifffile.TiffFile(io.BytesIO(raw)) as tif:
        page = tif.pages[0]
        chunks = [
            raw[o : o + c] for o, c in zip(page.dataoffsets, page.databytecounts, strict=True)
        ]
        decoded = page.asarray()
    variants = decoded.reshape(tile, n, tile, 3).transpose(1, 0, 2, 3).copy()
    return chunks, variants


def write_synthetic_pyramid(
    path: str | os.PathLike[str],
    size: int = 65536,
    *,
    tile: int = 512,
    mpp: float = 0.25,
    n_variants: int = 16,
    quality: int = 80,
    subifds: bool = False,
    seed: int = 0,
) -> SyntheticPyramid:
    """Write a ``size`` x ``size`` JPEG-tiled pyramidal BigTIFF to ``path`` from tile iterators.

    Levels halve until one tile; with ``subifds=False`` they follow each other in the main IFD
    chain (what OpenSlide's generic-TIFF reader expects), else they are SubIFDs (OME style).
    ``mpp`` (um/px at level 0) goes into X/YResolution in centimetres. Only the encoded variant
    tiles are held in memory, never a level.
    """
    import tifffile

    if size % tile or tile % 16:
        msg = f"size ({size}) must be a multiple of tile ({tile}), and tile a multiple of 16"
        raise ValueError(msg)
    path = Path(path)
    chunks, variants = _encode_variants(_variant_pixels(n_variants, tile, seed), tile, quality)
    shapes = []
    s = size
    while s >= tile:
        shapes.append((s, s))
        s //= 2

    def tiles(shape: tuple[int, int]):
        # Row-major tile order, as TIFF stores them.
        for ty in range(shape[0] // tile):
            for tx in range(shape[1] // tile):
                yield chunks[SyntheticPyramid.variant_index(ty, tx, n_variants)]

    common = dict(
        dtype=np.uint8, tile=(tile, tile), compression="jpeg", photometric="rgb",
        metadata=None,
    )  # fmt: skip
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, shape in enumerate(shapes):
            res = 1e4 / (mpp * 2**k)
            extra = {"subifds": len(shapes) - 1} if (subifds and k == 0) else {}
            if k and not subifds:
                extra["subfiletype"] = 1
            if k and subifds:
                extra["subfiletype"] = 1
            tw.write(
                tiles(shape), shape=(*shape, 3), resolution=(res, res),
                resolutionunit="CENTIMETER", **common, **extra,
            )  # fmt: skip
    return SyntheticPyramid(
        path=path, level_shapes=tuple(shapes), tile=tile, mpp=float(mpp), variants=variants
    )
