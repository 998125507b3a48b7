"""The engine: tiled == whole, level choice, partial results, cache, cancel, OOM, bad input."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

from histolens._engine import plan_analysis
from histolens.inference import TileCache, analyze, analyze_region
from histolens.region import Region
from histolens.result import NUCLEI_COLUMNS


@pytest.fixture(scope="module")
def image(synthetic_image):
    return synthetic_image(768, n=110, glass_cols=160)


@pytest.fixture(params=["simple", "hover"])
def postprocess(request):
    """Run each engine test with a plain labeller and with the real HoVer post-processing."""
    if request.param == "simple":
        request.getfixturevalue("simple_postprocess")
    else:
        pytest.importorskip("histolens.models.postprocess", reason="hover_instances not landed yet")
    return request.param


def _run(slide, region, **kw):
    kw.setdefault("cache", False)
    return analyze_region(slide, region, **kw)


def test_tiled_equals_whole_region(image, postprocess, fake_model, match_instances, pyramid_slide):
    """The oracle: small tiles with a halo give the one-big-tile result."""
    img, _ = image
    slide = pyramid_slide(img, mpp=0.5)  # model mpp 0.5 -> level 0, no resampling
    model = fake_model()
    region = Region(37, 21, 700, 650)
    tiled = _run(slide, region, model=model, tile_size=64, skip_background=False)
    whole = _run(slide, region, model=model, tile_size=768, skip_background=False)
    assert tiled.tiles_total > 50 and whole.tiles_total == 1
    a, b = tiled.nuclei.labels, whole.nuclei.labels
    assert a.shape == b.shape == (663, 629)
    matched, na, nb = match_instances(a, b)
    assert na == nb > 60
    assert matched == na, f"{na - matched} of {na} nuclei differ between tiled and whole runs"
    for key in ("area_um2", "class_id"):
        np.testing.assert_allclose(
            np.sort(tiled.nuclei.features[key].to_numpy()),
            np.sort(whole.nuclei.features[key].to_numpy()),
        )
    np.testing.assert_allclose(tiled.tiles.probabilities, whole.tiles.probabilities, atol=1e-6)
    np.testing.assert_array_equal(tiled.tiles.classes, whole.tiles.classes)
    for x, y in zip(tiled.attention, whole.attention, strict=True):
        np.testing.assert_allclose(x.heat, y.heat, atol=1e-6)


def test_tiled_equals_whole_when_resampling(
    image, fake_model, match_instances, pyramid_slide, simple_postprocess
):
    """Same oracle when no level matches and the engine resamples (0.3 um/px -> 0.5)."""
    img, _ = image
    slide = pyramid_slide(img, mpp=0.3)
    model = fake_model()
    region = Region(0, 0, 760, 600)
    tiled = _run(slide, region, model=model, tile_size=64, skip_background=False)
    whole = _run(slide, region, model=model, tile_size=512, skip_background=False)
    assert tiled.provenance.level == 0 and tiled.analysis_mpp == pytest.approx(0.5)
    assert tiled.nuclei.downsample == pytest.approx(0.5 / 0.3)
    matched, na, nb = match_instances(tiled.nuclei.labels, whole.nuclei.labels)
    assert na == nb > 40 and matched == na


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_level_choice_and_centroids_in_level0(
    image, level, fake_model, fake_card, pyramid_slide, simple_postprocess, synthetic_image
):
    """Model mpp = slide mpp * 2^k picks level k; centroids come back in level-0 pixels."""
    img, centres = synthetic_image(1024, n=60, radius=16.0, seed=3)
    slide = pyramid_slide(img, mpp=0.25)
    model = fake_model(fake_card(mpp=0.25 * 2**level))
    res = _run(slide, Region(0, 0, 1024, 1024), model=model, tile_size=64)
    assert res.provenance.level == level and res.nuclei.downsample == 2**level
    feats = res.nuclei.features
    assert list(feats.columns) == list(NUCLEI_COLUMNS)
    found = feats[["centroid_y", "centroid_x"]].to_numpy()
    d = np.sqrt(((found[:, None] - centres[None]) ** 2).sum(-1)).min(axis=1)
    assert len(found) >= 50
    # Block-mean levels blur disk edges; centres stay within a fraction of a level pixel.
    assert np.median(d) < 0.6 * 2**level + 0.6
    if level <= 1:  # at 8x a 16-px disk is 2 level pixels across; its area is not meaningful
        area = np.pi * 16.0**2 * 0.25**2
        assert np.median(feats["area_um2"]) == pytest.approx(area, rel=0.25)


def test_partial_results_are_progressive_and_consistent(
    image, fake_model, pyramid_slide, simple_postprocess
):
    img, _ = image
    slide = pyramid_slide(img, mpp=0.5)
    gen = analyze(
        slide, Region(0, 0, 768, 768), model=fake_model(), tile_size=128, batch_size=2, cache=False
    )
    results = list(gen)
    partial, final = results[:-1], results[-1]
    assert final.complete and not any(r.complete for r in partial)
    done = [r.tiles_done for r in partial]
    assert done == sorted(done) and len(partial) >= 5 and done[-1] < final.tiles_done == 36
    for r in partial:  # every snapshot is self-consistent: labels <-> features
        labs = set(np.unique(r.nuclei.labels)) - {0}
        assert labs == set(r.nuclei.features["label"])
    # Glass on the right: those tiles were skipped, not run, and show no class.
    assert final.provenance.tiles_skipped >= 6
    assert (final.tiles.classes[:, -4:] == 0).all() and (final.tiles.classes[:, :10] > 0).all()
    assert final.provenance.timings["model"] > 0 and "first_partial" in final.provenance.timings


def test_cache_reuses_tiles_and_overlaps(image, fake_model, pyramid_slide, simple_postprocess):
    img, _ = image
    slide = pyramid_slide(img, mpp=0.5)
    model = fake_model()
    cache = TileCache(64 * 2**20)
    first = analyze_region(slide, Region(0, 0, 512, 512), model=model, tile_size=128, cache=cache)
    calls = len(model.calls)
    again = analyze_region(slide, Region(0, 0, 512, 512), model=model, tile_size=128, cache=cache)
    assert len(model.calls) == calls  # nothing ran
    assert again.provenance.tiles_cached == again.tiles_total == first.tiles_total
    np.testing.assert_array_equal(first.nuclei.labels, again.nuclei.labels)
    # Pan right by one tile: only the new column of tiles runs.
    moved = analyze_region(slide, Region(0, 128, 512, 640), model=model, tile_size=128, cache=cache)
    assert moved.provenance.tiles_cached == 12 and moved.tiles_total == 16
    assert 0 < cache.nbytes <= cache.max_bytes
    # A different model object (same name, random weights) must not see these entries.
    other = analyze_region(
        slide, Region(0, 0, 512, 512), model=fake_model(), tile_size=128, cache=cache
    )
    assert other.provenance.tiles_cached == 0


def test_cache_is_bounded_by_bytes():
    from histolens._engine import TileOutput

    cache = TileCache(10_000)
    for i in range(10):
        cache.put(
            ("k", i), TileOutput(skipped=False, tile_probs=np.zeros((10, 10, 10), np.float32))
        )
    assert cache.nbytes <= 10_000 and len(cache) == 2
    assert cache.get(("k", 9)) is not None and cache.get(("k", 0)) is None


def test_cancel_stops_between_tiles(image, fake_model, pyramid_slide, simple_postprocess):
    img, _ = image
    slide = pyramid_slide(img, mpp=0.5)
    stop = threading.Event()
    results = []
    for r in analyze(
        slide,
        Region(0, 0, 768, 768),
        model=fake_model(),
        tile_size=128,
        batch_size=2,
        cancel=stop,
        cache=False,
    ):
        results.append(r)
        if len(results) == 2:
            stop.set()
    last = results[-1]
    assert last.provenance.cancelled and not last.complete
    assert 0 < last.tiles_done < last.tiles_total
    assert set(np.unique(last.nuclei.labels)) - {0} == set(last.nuclei.features["label"])
    # A callable works too.
    res = analyze_region(
        slide, Region(0, 0, 256, 256), model=fake_model(), cancel=lambda: True, cache=False
    )
    assert res.provenance.cancelled and res.tiles_done == 0


def test_out_of_memory_halves_the_batch(image, fake_model, pyramid_slide, simple_postprocess):
    class OOMModel(fake_model):
        """Raises the CUDA out-of-memory error for batches larger than 1."""

        def predict_tiles(self, tiles, **kw):
            if len(tiles) > 1:
                torch = pytest.importorskip("torch")
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().predict_tiles(tiles, **kw)

    img, _ = image
    slide = pyramid_slide(img, mpp=0.5)
    ref = _run(slide, Region(0, 0, 512, 512), model=fake_model(), tile_size=128, batch_size=4)
    oom = OOMModel()
    res = _run(slide, Region(0, 0, 512, 512), model=oom, tile_size=128, batch_size=4)
    assert set(oom.calls) == {1} and res.provenance.timings["oom_retries"] >= 2
    np.testing.assert_array_equal(ref.nuclei.labels, res.nuclei.labels)

    class Always(fake_model):
        def predict_tiles(self, tiles, **kw):
            raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(MemoryError, match="single tile"):
        _run(slide, Region(0, 0, 256, 256), model=Always(), tile_size=128)


def test_missing_mpp_needs_an_override(image, fake_model, pyramid_slide, simple_postprocess):
    img, _ = image
    slide = pyramid_slide(img, mpp=None)
    with pytest.raises(ValueError, match="pass mpp="):
        _run(slide, Region(0, 0, 128, 128), model=fake_model())
    res = _run(slide, Region(0, 0, 128, 128), model=fake_model(), mpp=0.5)
    assert res.provenance.mpp_source == "user" and res.provenance.slide_mpp == 0.5


def test_bad_regions(image, fake_model, pyramid_slide, simple_postprocess):
    img, _ = image
    slide = pyramid_slide(img, mpp=0.5)
    with pytest.raises(ValueError, match="outside slide"):
        _run(slide, Region(900, 900, 1000, 1000), model=fake_model())
    with pytest.warns(UserWarning, match="clipped"):
        res = _run(slide, Region(700, 700, 900, 900), model=fake_model())
    assert res.region == Region(700, 700, 768, 768) and res.nuclei.labels.shape == (68, 68)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = _run(slide, Region(10, 10, 10, 50), model=fake_model())
    assert empty.complete and empty.tiles_total == 0 and empty.nuclei.count == 0
    with pytest.raises(ValueError, match="unknown task"):
        _run(slide, Region(0, 0, 64, 64), model=fake_model(), tasks=("nuclei", "cells"))
    with pytest.raises(TypeError, match="predict_tiles"):
        _run(slide, Region(0, 0, 64, 64), model=object())


def test_tasks_subset_only_fills_what_was_asked(
    image, fake_model, pyramid_slide, simple_postprocess
):
    img, _ = image
    slide = pyramid_slide(img, mpp=0.5)
    res = _run(slide, Region(0, 0, 256, 256), model=fake_model(), tasks=("tiles",))
    assert res.nuclei is None and res.attention == [] and res.tiles.classes.shape == (8, 8)
    assert res.tiles.embeddings.shape == (8, 8, 3)


def test_plan_uses_choose_level(fake_card):
    card = fake_card(mpp=0.5)
    plan = plan_analysis(Region(10, 10, 1000, 1000), 0.25, (1.0, 4.0), card)
    assert (
        plan.level.level == 0 and plan.step == pytest.approx(2.0) and plan.f == pytest.approx(2.0)
    )
    assert plan.box == Region(5, 5, 500, 500)
    exact = plan_analysis(Region(10, 10, 1000, 1000), 0.499, (1.0, 4.0), card)
    assert exact.step == 1.0 and exact.analysis_mpp == pytest.approx(0.499)


def test_slide_from_array_and_real_svs(wsi_dir, fake_model, simple_postprocess, synthetic_image):
    """The engine runs on the project's own Slide type and on a real Aperio file."""
    slide_mod = pytest.importorskip("histolens.slide")
    img, _ = synthetic_image(512, n=30)
    mem = slide_mod.Slide.from_array(img, mpp=0.5, name="synthetic")
    res = _run(mem, Region(0, 0, 512, 512), model=fake_model())
    assert res.nuclei.count >= 25
    svs = slide_mod.open_slide(wsi_dir / "CMU-1-Small-Region.svs")
    res = _run(svs, Region(600, 800, 1112, 1312), model=fake_model(), tile_size=128)
    assert res.provenance.analysis_mpp == pytest.approx(0.499, abs=0.01)
    assert res.nuclei.labels.shape == (512, 512) and res.provenance.tiles_skipped < res.tiles_total


def test_blocks_of_tiles_equal_single_tiles_and_cache_per_tile(
    image, postprocess, fake_model, fake_card, match_instances, pyramid_slide
):
    """Default planning runs uncached tiles in blocks; results equal a one-tile run, and
    the cache keeps per-tile entries, so a shifted region reuses part of a block."""
    img, _ = image
    slide = pyramid_slide(img, mpp=0.5)
    model = fake_model(fake_card(tile_size=512, halo=32))
    plan = plan_analysis(Region(0, 0, 700, 700), 0.5, slide.downsamples, model.card)
    assert plan.grid.size == 128 and plan.grid.halo == 64 and plan.block_cells == 3
    region = Region(37, 21, 700, 650)
    blocks = _run(slide, region, model=model, skip_background=False)
    assert len(model.calls) < blocks.tiles_total  # several tiles per model input
    whole = _run(slide, region, model=model, tile_size=768, skip_background=False)
    matched, na, nb = match_instances(blocks.nuclei.labels, whole.nuclei.labels)
    assert na == nb > 60 and matched == na
    np.testing.assert_allclose(blocks.tiles.probabilities, whole.tiles.probabilities, atol=1e-6)
    cache = TileCache()
    model.calls.clear()
    first = analyze_region(
        slide, Region(0, 0, 384, 384), model=model, cache=cache, skip_background=False
    )
    assert first.tiles_total == 9 and model.calls == [1]  # one 3 x 3 block
    shifted = analyze_region(
        slide, Region(0, 128, 384, 512), model=model, cache=cache, skip_background=False
    )
    assert shifted.provenance.tiles_cached == 6 and model.calls == [
        1,
        1,
    ]  # new column: one 3 x 1 block


def test_device_and_precision_resolution(monkeypatch):
    torch = pytest.importorskip("torch")
    from histolens._engine import resolve_device
    from histolens.models import precision
    from histolens.models.precision import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) in ("mps", "cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    assert resolve_precision("cpu", "fp32") == "fp32"
    assert resolve_precision("mps") == "fp16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("cpu") == "fp32"  # no native bf16: stay in fp32
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("cpu") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("cpu", "int8")


def test_first_model_call_is_one_tile_at_the_centre(
    image, fake_model, fake_card, pyramid_slide, simple_postprocess
):
    """A fresh view paints first where the user looks: the centre tile alone, then blocks."""
    img, _ = image
    slide = pyramid_slide(img, mpp=0.5)
    model = fake_model(fake_card(tile_size=512, halo=32))  # 128-px tiles, halo 64, 3 x 3 blocks
    gen = analyze(slide, Region(0, 0, 768, 768), model=model, cache=False, skip_background=False)
    first = next(gen)
    assert model.shapes[0] == (256, 256) and first.tiles_done == 1
    painted = np.nonzero(first.tiles.classes)
    # class cells are 32 px: the centre tile (rows/cols 256..384 px) is cells 8..11
    assert set(painted[0]) <= set(range(8, 12)) and set(painted[1]) <= set(range(8, 12))
    rest = list(gen)
    assert rest[-1].complete and max(s[0] for s in model.shapes) == 512  # then 3 x 3 blocks


def test_fake_model_is_local(fake_model, synthetic_image):
    """Outputs in the middle do not change when far-away pixels do (receptive field < halo)."""
    img, _ = synthetic_image(256, n=20)
    model = fake_model()
    a = model.predict_tiles(img[None, :128, :128])
    img2 = img.copy()
    img2[:128, 100:128] = 0
    b = model.predict_tiles(img2[None, :128, :128])
    inner = (slice(None), slice(32, 96), slice(32, 96 - model.receptive_field - 2 * 4))
    np.testing.assert_array_equal(a["nuclei_prob"][inner], b["nuclei_prob"][inner])


def test_synthetic_pyramid_levels(fake_model, pyramid_slide, synthetic_image):
    img, centres = synthetic_image(256, n=10)
    slide = pyramid_slide(img, n_levels=3)
    assert slide.shape == (256, 256)
    assert [lv.shape[0] for lv in slide.levels] == [256, 128, 64]
    assert len(centres) == 10
    with pytest.raises(ValueError, match="multiples"):
        fake_model().predict_tiles(img[None, :100, :100])
