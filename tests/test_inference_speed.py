"""Issue 15's engine changes: nuclei decoded only where kept, CPU settings, progress text.

The speed itself is measured by ``benchmarks/inference_speed.py`` and
``benchmarks/small_images.py``; these tests check that the faster paths give the same
results as the old ones.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

import histolens._engine as engine
from histolens._engine import nuclei_box
from histolens.cpu import THREADS_ENV, configure_cpu, default_threads, physical_cores
from histolens.inference import TileCache, analyze_region
from histolens.progress import progress_text, seconds_left
from histolens.region import Region
from histolens.tiles import Block, TileGrid


@pytest.fixture
def cropping_model(fake_model, fake_card):
    """A new local fake model (512 px tiles, halo 32) taking ``nuclei_box`` like the real one
    (full maps, then cut); it records the box of every call in ``boxes``."""

    class CroppingFakeModel(fake_model):
        supports_nuclei_box = True

        def __init__(self, card=None) -> None:
            super().__init__(card)
            self.boxes: list[tuple[int, int, int, int] | None] = []

        def predict_tiles(self, tiles, *, nuclei_box=None, **kw):
            out = super().predict_tiles(tiles, **kw)
            self.boxes.append(nuclei_box)
            if nuclei_box is not None and "nuclei_prob" in out:
                y0, x0, y1, x1 = nuclei_box
                for key in ("nuclei_prob", "hv", "type_prob"):
                    out[key] = out[key][..., y0:y1, x0:x1]
            return out

    return CroppingFakeModel(fake_card(tile_size=512, halo=32))


@pytest.fixture(scope="module")
def slide(pyramid_slide, synthetic_image):
    img, _ = synthetic_image(768, n=110)
    return pyramid_slide(img, mpp=0.5)


def _labels_equal(a, b) -> None:
    assert a.nuclei.count == b.nuclei.count > 10
    np.testing.assert_array_equal(a.nuclei.labels, b.nuclei.labels)
    np.testing.assert_array_equal(a.tiles.probabilities, b.tiles.probabilities)


def test_cropped_decoding_equals_the_old_path(slide, monkeypatch, cropping_model):
    """Nuclei decoded over the owned part inside the view + margin == the whole input."""
    monkeypatch.setattr(engine, "NUCLEI_MARGIN_UM", 8.0)  # 16 px: above the fake's reach
    model = cropping_model
    region = Region(37, 21, 700, 650)  # edges off the tile grid: edge tiles decoded in part
    old = analyze_region(slide, region, model=model, cache=False, crop_decoder=False)
    assert set(model.boxes) == {None}
    model.boxes.clear()
    new = analyze_region(slide, region, model=model, cache=False)
    assert None not in model.boxes
    assert len({b for b in model.boxes}) > 1  # edge blocks decode a smaller part
    _labels_equal(old, new)


def test_edge_tiles_are_recomputed_when_a_later_view_needs_more(slide, monkeypatch, cropping_model):
    monkeypatch.setattr(engine, "NUCLEI_MARGIN_UM", 8.0)
    model = cropping_model  # 128 px tiles
    cache = TileCache()
    analyze_region(slide, Region(0, 0, 320, 320), model=model, cache=cache)
    # Tiles of rows/cols 0-1 are whole; row/col 2 (256..384) was decoded up to 320 only.
    shifted = analyze_region(slide, Region(0, 0, 384, 384), model=model, cache=cache)
    assert shifted.provenance.tiles_cached == 4
    fresh = analyze_region(slide, Region(0, 0, 384, 384), model=model, cache=False)
    _labels_equal(shifted, fresh)


def test_nuclei_box_stays_inside_the_input():
    grid = TileGrid(128, 64, 32)
    tiles = tuple(grid.tiles(Region(0, 0, 256, 128)))
    block = Block(tiles, Region(0, 0, 256, 128), Region(-64, -64, 320, 192))
    assert nuclei_box(block, 16) == Region(-16, -16, 272, 144)
    assert nuclei_box(block, 500) == block.outer
    assert nuclei_box(block, 16, view=Region(10, 20, 100, 90)) == Region(-6, 4, 116, 106)


def test_threads_default_and_override(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert default_threads() == physical_cores() >= 1
    monkeypatch.setenv(THREADS_ENV, "3")
    assert default_threads() == 3
    for bad in ("zero", "0", "-2"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(ValueError, match=THREADS_ENV):
            default_threads()
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        assert configure_cpu(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="positive"):
        configure_cpu(0)


def test_progress_text_estimates_the_time_left():
    prov = types.SimpleNamespace(
        tiles_done=5,
        tiles_total=25,
        seconds=2.0,
        timings={"planned_input_px": 4e6, "model_input_px": 1e6},
    )
    assert seconds_left(prov) == pytest.approx(6.0)
    assert progress_text(prov) == "5 / 25 tiles, about 6 s left"
    prov.timings = {"planned_input_px": 4e6, "model_input_px": 0.0}
    assert seconds_left(prov) is None and progress_text(prov) == "5 / 25 tiles"
    prov.timings, prov.seconds = {"planned_input_px": 4e6, "model_input_px": 1e5}, 30.0
    assert progress_text(prov) == "5 / 25 tiles, about 20 min left"


# -- the real default model on the real sample slide -----------------------------------------


def test_default_model_nuclei_box_equals_full_maps(default_model, wsi_dir):
    """The cropped decoder gives the full decoder's maps inside the box (and with TTA)."""
    from histolens.models.tta import TestTimeAugmented
    from histolens.slide import open_slide

    slide = open_slide(wsi_dir / "CMU-1-Small-Region.svs")
    tile = np.asarray(slide.levels[0][900:1220, 800:1120])[None]  # 320 px, 5 x 64
    box = (96, 64, 240, 300)
    for model in (default_model, TestTimeAugmented(default_model)):
        full = model.predict_tiles(tile, tasks=("nuclei",), precision="fp32")
        part = model.predict_tiles(tile, tasks=("nuclei",), precision="fp32", nuclei_box=box)
        for key in ("nuclei_prob", "hv", "type_prob"):
            want = full[key][..., 96:240, 64:300]
            assert part[key].shape == want.shape
            np.testing.assert_allclose(part[key], want, atol=1e-5)


def test_default_model_engine_old_and_new_paths_agree(default_model, wsi_dir):
    """Same nuclei, label for label, from the old and the new engine on a real region."""
    from histolens.slide import open_slide

    slide = open_slide(wsi_dir / "CMU-1-Small-Region.svs")
    region = Region(1000, 700, 1460, 1160)
    kw = {"model": default_model, "cache": False, "precision": "fp32"}
    old = analyze_region(slide, region, crop_decoder=False, **kw)
    new = analyze_region(slide, region, **kw)
    assert new.provenance.timings["decoded_px"] < 0.6 * old.provenance.timings["decoded_px"]
    _labels_equal(old, new)


def test_view_box_follows_the_pixels():
    from histolens.models.tta import DIHEDRAL_VIEWS, apply_view, view_box

    arr = np.arange(1 * 6 * 8 * 3, dtype=np.uint8).reshape(1, 6, 8, 3)
    y0, x0, y1, x1 = 1, 2, 4, 7
    for view in DIHEDRAL_VIEWS:
        vy0, vx0, vy1, vx1 = view_box((y0, x0, y1, x1), (6, 8), view)
        np.testing.assert_array_equal(
            apply_view(arr, view)[:, vy0:vy1, vx0:vx1], apply_view(arr[:, y0:y1, x0:x1], view)
        )
