"""OME-Zarr masks: a multiscale pyramid (ome-zarr-py) that viewers open on the slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histolens import Region, export
from histolens.export._masks import Mask, mask_pyramid, save_ome_zarr
from histolens.region import layer_transform

#: A tissue-rich crop of CMU-1-Small-Region (level-0 px).
REGION = Region(1500, 600, 2012, 1112)


def _open(path: Path):
    """The store as ome-zarr-py's reader (napari-ome-zarr's) sees it: one multiscale node."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    (node,) = list(Reader(parse_url(str(path)))())
    levels = [np.asarray(level) for level in node.data]
    transforms = [
        ({t["type"]: t[t["type"]] for t in level})
        for level in node.metadata["coordinateTransformations"]
    ]
    return levels, transforms, node.metadata


def test_labels_are_halved_by_the_block_mode_not_averaged():
    labels = np.array(
        [
            [1, 1, 2, 3, 7],
            [0, 1, 4, 5, 7],
            [6, 6, 0, 0, 9],
            [8, 8, 0, 2, 9],
        ],
        np.uint16,
    )
    base, half = mask_pyramid(labels, top_px=3)
    assert base is labels or np.array_equal(base, labels)
    # 2 x 2 blocks: majority 1; all different -> top-left 2; two pairs -> top-left 6;
    # majority 0; the odd last column is repeated (7, 7 / 9, 9).
    np.testing.assert_array_equal(half, [[1, 2, 7], [6, 0, 9]])
    assert half.dtype == np.uint16
    heat = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_allclose(mask_pyramid(heat, top_px=2)[1], [[2.5, 4.5], [10.5, 12.5]])


def test_written_pyramid_has_halved_levels_placed_by_layer_transform(tmp_path: Path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(600, 700), dtype=np.uint32)
    mask = Mask("nuclei_labels", labels, 2.0, (1000.0, 2000.0), "nuclei")
    path = save_ome_zarr(tmp_path / "m.ome.zarr", mask, mpp=0.25)
    levels, transforms, meta = _open(path)
    assert [lv.shape for lv in levels] == [(600, 700), (300, 350), (150, 175)]
    np.testing.assert_array_equal(levels[0], labels)
    for k, (level, t) in enumerate(zip(levels, transforms, strict=True)):
        np.testing.assert_array_equal(level, mask_pyramid(labels)[k])
        scale, translate = layer_transform(0.25, 2.0 * 2**k, (1000, 2000))
        assert tuple(t["scale"]) == pytest.approx(scale)
        assert tuple(t["translation"]) == pytest.approx(translate)
        # Level-k pixel i covers level-0-array pixels [i 2^k, (i + 1) 2^k): its centre in the
        # world is the centre of that block as placed by level 0.
        i = np.array([0.0, 7.0, 149.0])
        block_centre = i * 2**k + (2**k - 1) / 2
        world0 = transforms[0]["translation"][0] + transforms[0]["scale"][0] * block_centre
        np.testing.assert_allclose(t["translation"][0] + t["scale"][0] * i, world0)
    assert [a["unit"] for a in meta["axes"]] == ["micrometer", "micrometer"]
    assert meta["name"] == "nuclei"


def test_real_model_masks_open_in_napari_on_the_slide(wsi_dir: Path, tmp_path: Path):
    """histolens-default on a real crop -> OME-Zarr -> ome-zarr-py's reader -> napari layers:
    each nucleus centroid, taken from the slide layer's world frame into the labels layer's
    data frame, falls on that nucleus in every pyramid level."""
    import torch
    from napari.layers import Image, Labels

    from histolens.inference import analyze_region
    from histolens.layers import slide_to_layer_data
    from histolens.slide import open_slide

    torch.set_num_threads(1)
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as slide:
        result = analyze_region(slide, REGION, tasks=("nuclei",), cache=False)
        slide_data, slide_meta, _ = slide_to_layer_data(slide)
        slide_layer = Image(slide_data, **{k: v for k, v in slide_meta.items() if k != "metadata"})
    files = export.write_result(result, tmp_path, formats=("ome-zarr",))
    levels, transforms, _ = _open(files["nuclei_labels.ome.zarr"])
    nuc = result.nuclei
    assert len(levels) >= 2 and levels[0].shape == nuc.labels.shape
    np.testing.assert_array_equal(levels[0], nuc.labels)
    # napari-ome-zarr gives the layer level 0's transform and the levels as a multiscale.
    layer = Labels(
        levels,
        multiscale=True,
        scale=transforms[0]["scale"],
        translate=transforms[0]["translation"],
    )
    assert [tuple(s) for s in layer.level_shapes] == [lv.shape for lv in levels]
    f = nuc.features
    assert len(f) > 20
    hits = {k: 0 for k in range(len(levels))}
    for label, cy, cx in zip(f["label"], f["centroid_y"], f["centroid_x"], strict=True):
        r, c = layer.world_to_data(slide_layer.data_to_world((cy, cx)))
        # exact placement: level-0 pixel index (cy, cx) -> label-array index
        want = (
            (cy - nuc.origin[0] + 0.5) / nuc.downsample - 0.5,
            (cx - nuc.origin[1] + 0.5) / nuc.downsample - 0.5,
        )
        assert (r, c) == pytest.approx(want, abs=1e-6)
        for k, level in enumerate(levels):
            rk, ck = (int(np.floor((v + 0.5) / 2**k)) for v in (r, c))
            hits[k] += int(level[rk, ck] == label)
    assert hits[0] >= 0.9 * len(f)  # centroids of (convex) nuclei lie inside them
    assert hits[1] >= 0.8 * len(f)  # the mode keeps most nuclei at half resolution
