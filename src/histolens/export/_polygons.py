"""Label images -> closed polygon rings in level-0 pixels (the GeoJSON frame).

Level-0 pixels, ``x`` to the right, ``y`` down, pixel ``(0, 0)`` covering ``[0, 1) x [0, 1)``
(pixel *edges*, not centres). A label array at ``downsample`` ``f`` whose pixel (0, 0) starts
at level-0 ``origin = (y0, x0)`` has its array pixel ``(r, c)`` covering level-0
``[y0 + r f, y0 + (r + 1) f) x [x0 + c f, x0 + (c + 1) f)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["iter_label_polygons", "labels_to_polygons"]

#: Pixels per band when a whole label image is scanned (bounds the temporaries).
_BAND_PX = 1 << 20


def _ring_to_level0(
    contour: np.ndarray, offset: tuple[int, int], downsample: float, origin: Sequence[float]
) -> np.ndarray:
    """(row, col) contour of a crop -> closed (x, y) ring in level-0 px (edge convention)."""
    f = float(downsample)
    # find_contours puts array pixel centres at integer coordinates; the centre of array
    # pixel r is level-0 y0 + (r + 0.5) f in the edge convention GeoJSON uses.
    ys = float(origin[0]) + (contour[:, 0] + offset[0] + 0.5) * f
    xs = float(origin[1]) + (contour[:, 1] + offset[1] + 0.5) * f
    ring = np.stack([xs, ys], axis=1)
    if not np.array_equal(ring[0], ring[-1]):
        ring = np.vstack([ring, ring[:1]])
    # RFC 7946: exterior rings counter-clockwise by the shoelace sign in (x, y).
    x, y = ring[:, 0], ring[:, 1]
    if float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) < 0:
        ring = ring[::-1]
    return ring


def labels_to_polygons(
    labels: np.ndarray,
    *,
    downsample: float = 1.0,
    origin: Sequence[float] = (0, 0),
    tolerance: float = 0.5,
) -> dict[int, list[np.ndarray]]:
    """Outline every non-zero label as closed rings in level-0 pixels ``(x, y)``.

    The dict of :func:`iter_label_polygons` (see there for frames and simplification).
    """
    return dict(
        iter_label_polygons(labels, downsample=downsample, origin=origin, tolerance=tolerance)
    )


def iter_label_polygons(
    labels: np.ndarray,
    *,
    downsample: float = 1.0,
    origin: Sequence[float] = (0, 0),
    tolerance: float = 0.5,
) -> Iterator[tuple[int, list[np.ndarray]]]:
    """``(label, rings)`` for every non-zero label, in ascending label order, one at a time.

    ``labels`` is an integer ``(h, w)`` array at ``downsample`` level-0 px per pixel, pixel
    (0, 0) starting at level-0 ``origin = (y0, x0)``. Each label maps to one ring per
    connected part (marching squares at the 0.5 iso-line of its mask, holes filled: a
    nucleus is exported as its outline), simplified with Douglas-Peucker at ``tolerance``
    array pixels (0 keeps every vertex). Rings are ``(n, 2)`` float arrays, first == last.
    """
    lab = np.asarray(labels)
    if lab.ndim != 2:
        msg = f"labels must be a 2-D (h, w) array, got shape {lab.shape}"
        raise ValueError(msg)
    if lab.dtype.kind not in "iu":
        msg = f"labels must be integers (0 = background), got dtype {lab.dtype}"
        raise ValueError(msg)
    # Checked above, outlined lazily below: a bad array fails here, not mid-way through a file.
    return _outline_labels(lab, downsample, origin, tolerance)


def _outline_labels(
    lab: np.ndarray, downsample: float, origin: Sequence[float], tolerance: float
) -> Iterator[tuple[int, list[np.ndarray]]]:
    from scipy import ndimage
    from skimage.measure import approximate_polygon, find_contours

    if lab.size == 0 or not lab.any():
        return
    # Unique ids band by band: np.unique on a whole slide's labels would sort a full copy.
    band = max(1, _BAND_PX // max(1, lab.shape[1]))
    present = np.unique(
        np.concatenate([np.unique(lab[y : y + band]) for y in range(0, lab.shape[0], band)])
    )
    present = present[present != 0]
    # find_objects allocates one slot per value up to the maximum; compact sparse ids first.
    if int(present[-1]) > 4 * len(present) + 1024:
        compact = np.searchsorted(present, lab).astype(np.int64) + 1
        compact[lab == 0] = 0
        lookup = present
    else:
        compact, lookup = lab, None
    for index, box in enumerate(ndimage.find_objects(compact)):
        if box is None:
            continue
        value = index + 1
        label_id = int(lookup[index]) if lookup is not None else value
        mask = ndimage.binary_fill_holes(compact[box] == value)
        padded = np.pad(mask, 1).astype(np.uint8)
        rings = []
        offset = (box[0].start - 1, box[1].start - 1)
        for contour in find_contours(padded, 0.5):
            if len(contour) < 4:
                continue
            if tolerance > 0:
                simple = approximate_polygon(contour, tolerance)
                # Keep the full trace when simplification would collapse a tiny shape.
                contour = simple if len(simple) >= 4 else contour
            rings.append(_ring_to_level0(contour, offset, downsample, origin))
        if rings:
            yield label_id, rings
