"""Tiling, halo planning, tissue test, instance ownership (pure geometry, no slide reading)."""

from __future__ import annotations

import numpy as np
import pytest

from histolens.region import Region
from histolens.tiles import (
    CellCanvas,
    InstanceCanvas,
    Tile,
    TileGrid,
    cells_covering,
    keep_instances,
    plan_grid,
    tissue_fraction,
)


def test_plan_grid_rounds_halo_up_and_aligns():
    g = plan_grid(256, 20, [32, 64, 16])
    assert g.multiple == 64
    assert g.halo == 64  # never less context than asked
    assert g.size % 64 == 0 and g.size >= 64
    assert plan_grid(512, 32, [32], inner=300).size == 288
    with pytest.raises(ValueError, match="multiples"):
        TileGrid(size=100, halo=32, multiple=32)


@pytest.mark.parametrize(
    "box", [Region(0, 0, 100, 100), Region(37, 5, 301, 260), Region(64, 64, 65, 65)]
)
def test_tiles_partition_the_box(box):
    grid = TileGrid(size=64, halo=32, multiple=32)
    tiles = grid.tiles(box)
    cover = np.zeros((400, 400), np.int32)
    for t in tiles:
        cover[t.inner.y0 : t.inner.y1, t.inner.x0 : t.inner.x1] += 1
        assert t.outer.y0 == t.inner.y0 - 32 and t.outer.shape == (128, 128)
    assert (cover[box.y0 : box.y1, box.x0 : box.x1] == 1).all()  # each pixel owned exactly once
    assert grid.tiles(Region(5, 5, 5, 9)) == []


def test_tissue_fraction_separates_glass_from_stain():
    glass = np.full((64, 64, 3), 242, np.uint8)
    stain = np.empty((64, 64, 3), np.uint8)
    stain[:] = (200, 120, 190)
    assert tissue_fraction(glass) == 0.0
    assert tissue_fraction(stain) == 1.0
    half = glass.copy()
    half[:, :32] = stain[:, :32]
    assert tissue_fraction(half) == pytest.approx(0.5, abs=0.05)


def test_seam_nucleus_is_kept_once_and_whole():
    """A disk straddling the seam of two tiles appears once, with all its pixels."""
    grid = TileGrid(size=32, halo=16, multiple=16)
    yy, xx = np.mgrid[0:64, 0:96]
    disk = ((yy - 20) ** 2 + (xx - 30) ** 2 <= 16).astype(np.uint32)  # centre x=30 in tile 0
    disk2 = ((yy - 40) ** 2 + (xx - 34) ** 2 <= 16).astype(np.uint32) * 2  # centre x=34 in tile 1
    full = disk + disk2
    canvas = InstanceCanvas(Region(0, 0, 64, 64))
    kept = 0
    for t in grid.tiles(Region(0, 0, 64, 64)):
        sub = np.zeros(t.outer.shape, np.uint32)
        y0, x0 = max(t.outer.y0, 0), max(t.outer.x0, 0)
        y1, x1 = min(t.outer.y1, 64), min(t.outer.x1, 96)
        sub[y0 - t.outer.y0 : y1 - t.outer.y0, x0 - t.outer.x0 : x1 - t.outer.x0] = full[
            y0:y1, x0:x1
        ]
        inst = keep_instances(sub, t, types=[0, 1], probs=[0.9, 0.8])
        kept += inst.count
        canvas.paste(inst)
    assert kept == 2
    table = canvas.table()
    assert sorted(table[:, 0]) == [1, 2]
    assert set(np.unique(canvas.labels)) == {0, 1, 2}
    assert (canvas.labels > 0).sum() == (full[:64, :64] > 0).sum()
    by_type = {int(r[4]): r for r in table}
    assert by_type[0][2] == pytest.approx(30) and by_type[1][2] == pytest.approx(34)


def test_canonical_renumbers_a_slide_sized_canvas_in_place_without_big_temporaries():
    """Labels 1..n by centroid (y, x), the same image as a lookup, and no canvas-sized copy."""
    import tracemalloc

    from histolens.tiles import TileInstances

    h, w = 8192, 4096  # 128 MB of uint32: a small slide's canvas
    canvas = InstanceCanvas(Region(0, 0, h, w))
    # Pasted bottom-up, so paste order and canonical (top-down) order differ.
    spots = [(7000, 100), (5000, 3000), (30, 4000), (30, 20)]
    for i, (y, x) in enumerate(spots):
        lab = np.zeros((8, 8), np.uint32)
        lab[2:6, 2:6] = 1
        canvas.paste(
            TileInstances(
                labels=lab,
                origin=(y - 4, x - 4),
                centroids=np.array([[y - 0.5, x - 0.5]]),
                types=np.array([i]),
                probs=np.array([0.5]),
            )
        )
    before = canvas.labels[[7000, 5000, 30, 30], [100, 3000, 4000, 20]].tolist()
    assert before == [1, 2, 3, 4]
    tracemalloc.start()
    labels, rows = canvas.canonical()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert labels is canvas.labels
    assert labels[[30, 30, 5000, 7000], [20, 4000, 3000, 100]].tolist() == [1, 2, 3, 4]
    assert rows[:, 0].tolist() == [1, 2, 3, 4] and rows[:, 4].tolist() == [3, 2, 1, 0]
    assert np.bincount(labels[labels > 0]).tolist() == [0, 16, 16, 16, 16]
    assert peak < labels.nbytes / 2, f"canonical() peaked at {peak / 1e6:.0f} MB"


def test_cell_canvas_clips_to_its_box():
    box = cells_covering(Region(10, 10, 100, 70), 32)
    assert box == Region(0, 0, 4, 3)
    canvas = CellCanvas(box, (2,))
    canvas.paste(np.ones((2, 2, 2), np.float32), (3, 2))
    assert canvas.data[3, 2].tolist() == [1, 1] and canvas.data.sum() == 2


def test_group_tiles_makes_rectangles_of_free_tiles():
    from histolens.tiles import group_tiles

    grid = TileGrid(size=64, halo=32, multiple=32)
    tiles = grid.tiles(Region(0, 0, 64 * 4, 64 * 5))
    cached = {(0, 0), (2, 3)}
    todo = [t for t in tiles if (t.row, t.col) not in cached]
    blocks = group_tiles(todo, grid, 3)
    owned = [(t.row, t.col) for b in blocks for t in b.tiles]
    assert sorted(owned) == sorted((t.row, t.col) for t in todo)  # each uncached tile once
    for b in blocks:
        rows = {t.row for t in b.tiles}
        cols = {t.col for t in b.tiles}
        assert len(rows) <= 3 and len(cols) <= 3 and len(b.tiles) == len(rows) * len(cols)
        assert b.outer.height == b.inner.height + 64 and b.inner.height == 64 * len(rows)
    assert len(group_tiles(todo, grid, 1)) == len(todo)


def test_split_instances_equals_keep_instances_per_tile():
    """One pass over a block's labels gives each tile exactly what keep_instances would."""
    from scipy import ndimage

    from histolens.tiles import group_tiles, split_instances

    rng = np.random.default_rng(5)
    grid = TileGrid(size=64, halo=32, multiple=32)
    block = group_tiles(grid.tiles(Region(0, 0, 192, 128)), grid, 3)[0]
    assert len(block.tiles) == 6
    blobs = ndimage.gaussian_filter(rng.random(block.outer.shape), 3) > 0.52
    labels, n = ndimage.label(blobs)
    assert n > 20
    types = rng.integers(0, 4, n)
    probs = rng.random(n).astype(np.float32)
    split = split_instances(labels.astype(np.uint32), block, types, probs)
    assert sum(s.count for s in split) > 10
    total = 0
    for tile, got in zip(block.tiles, split, strict=True):
        in_block = Tile(tile.row, tile.col, tile.inner, block.outer)  # labels cover block.outer
        want = keep_instances(labels.astype(np.uint32), in_block, types, probs)
        total += want.count
        assert got.count == want.count and got.origin == want.origin
        np.testing.assert_array_equal(got.labels, want.labels)
        np.testing.assert_allclose(got.centroids, want.centroids)
        np.testing.assert_array_equal(got.types, want.types)
        np.testing.assert_array_equal(got.probs, want.probs)
    assert total == sum(s.count for s in split)
    empty = split_instances(np.zeros(block.outer.shape, np.uint32), block)
    assert [e.count for e in empty] == [0] * 6
