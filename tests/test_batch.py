"""Batch runs: shards == whole-region engine run == dask.distributed run; failures skip."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histolens import Region
from histolens._engine import plan_analysis
from histolens.batch import BatchOptions, run_batch, tissue_mask
from histolens.batch._cli import add_arguments, run
from histolens.batch._plan import shard_blocks
from histolens.batch._tissue import tiles_in_mask
from histolens.inference import analyze_region
from histolens.models import ALL_TASKS, get_card
from histolens.slide import open_slide, write_synthetic_pyramid
from histolens.tiles import TileGrid, group_tiles


class ThresholdModel:
    """A deterministic numpy stand-in for a network: dark purple pixels are nuclei.

    It has the test-tiny card (tile 256, halo 32, 0.5 um/px) so the engine plans the same
    grid, but produces real, image-dependent nuclei, so block seams are actually exercised.
    """

    def __init__(self) -> None:
        self.card = get_card("test-tiny")

    def predict_tiles(self, tiles: np.ndarray, *, tasks=ALL_TASKS, precision: str = "auto") -> dict:
        x = tiles.astype(np.float32) / 255.0
        grey = x.mean(axis=-1)
        b, h, w = grey.shape
        prob = (grey < 0.55).astype(np.float32)
        red = x[..., 0]
        c = int(self.card.class_cell_px)
        pooled = grey.reshape(b, h // c, c, w // c, c).mean(axis=(2, 4))
        tile_probs = np.stack([1 - pooled, pooled, np.zeros_like(pooled)], axis=-1) + 1e-3
        s = int(self.card.attention_strides[0])
        return {
            "nuclei_prob": prob,
            "hv": np.zeros((b, 2, h, w), np.float32),
            "type_prob": np.stack([red, 1 - red], axis=1),
            "tile_probs": tile_probs / tile_probs.sum(-1, keepdims=True),
            "embeddings": np.stack([pooled, pooled**2], axis=-1),
            "attention": {0: grey.reshape(b, h // s, s, w // s, s).mean(axis=(2, 4))},
        }


@pytest.fixture(scope="module")
def synthetic_slide(tmp_path_factory) -> Path:
    """1024 x 1024 px H&E-like pyramid at 0.5 um/px: with the test-tiny card, 3 x 3 shards
    at shard_px=384 (the last row and column partly beyond the slide)."""
    path = tmp_path_factory.mktemp("slides") / "synthetic.tif"
    write_synthetic_pyramid(path, 1024, tile=256, mpp=0.5)
    return path


def _plan(slide, region=None):
    return plan_analysis(
        region or Region.full(slide.shape), slide.mpp, slide.downsamples, get_card("test-tiny")
    )


def _assert_same(a, b, *, atol: float = 0.0) -> None:
    """Labels, classes and geometry exactly equal; float outputs within ``atol``.

    A torch model's float32 sums depend on the BLAS thread count and the batch it ran in
    (last-bit differences, ~3e-8), so real-model comparisons pass ``atol=1e-6``.
    """
    assert a.nuclei.count == b.nuclei.count
    np.testing.assert_array_equal(a.nuclei.labels, b.nuclei.labels)
    pd.testing.assert_frame_equal(a.nuclei.features, b.nuclei.features, atol=atol, rtol=0)
    np.testing.assert_array_equal(a.tiles.classes, b.tiles.classes)
    np.testing.assert_allclose(a.tiles.probabilities, b.tiles.probabilities, atol=atol, rtol=0)
    np.testing.assert_allclose(a.tiles.embeddings, b.tiles.embeddings, atol=atol, rtol=0)
    assert [m.scale for m in a.attention] == [m.scale for m in b.attention]
    for x, y in zip(a.attention, b.attention, strict=True):
        np.testing.assert_allclose(x.heat, y.heat, atol=atol, rtol=0)
        assert (x.downsample, x.origin) == (y.downsample, y.origin)


def test_shards_hold_whole_model_blocks_row_major():
    grid = TileGrid(size=64, halo=32, multiple=32)
    tiles = grid.tiles(Region(0, 0, 10 * 64, 7 * 64))
    blocks = group_tiles(tiles, grid, 3)  # 3 x 3 tiles per model block, as the engine runs them
    shards = shard_blocks(blocks, shard_px=384)  # two model blocks (2 x 192 px) per side
    assert [len(s) for s in shards] == [4, 2, 4, 2]
    assert sorted((t.row, t.col) for s in shards for b in s for t in b.tiles) == sorted(
        (t.row, t.col) for t in tiles
    )
    for shard in shards:
        corners = {(b.inner.y0 // 384, b.inner.x0 // 384) for b in shard}
        assert len(corners) == 1


def test_tiles_in_mask_keep_exactly_the_tiles_touching_tissue():
    grid = TileGrid(size=100, halo=0)
    tiles = grid.tiles(Region(0, 0, 400, 400))
    mask = np.zeros((40, 40), bool)  # 20 level-0 px per mask pixel at f = 2 analysis -> level-0
    mask[12, 30] = True  # level-0 y in [240, 260), x in [600, 620) -> analysis (120..130, 300..310)
    keep = tiles_in_mask(tiles, 2.0, mask, (20.0, 20.0))
    assert [(t.row, t.col) for t, k in zip(tiles, keep, strict=True) if k] == [(1, 3)]


def test_tissue_mask_on_a_real_slide(wsi_dir: Path):
    slide = open_slide(wsi_dir / "CMU-1-Small-Region.svs")
    mask, (sy, sx) = tissue_mask(slide)
    assert mask.shape == (1483, 1110) and sy == pytest.approx(2.0, abs=0.01)
    # the section covers about a third of the image; the left and top-left are glass
    assert 0.25 < mask.mean() < 0.5
    assert mask[:, :100].mean() < 0.05 and mask[-300:, 350:700].mean() > 0.9


def test_blocks_match_the_whole_region_engine_run(synthetic_slide: Path, tmp_path: Path):
    model = ThresholdModel()
    got = {}
    options = BatchOptions(
        model=model, tasks=ALL_TASKS, tissue_mask=False, shard_px=384, progress=False
    )
    outcomes = run_batch(
        [synthetic_slide], tmp_path, options, on_result=lambda p, r: got.setdefault("batch", r)
    )
    slide = open_slide(synthetic_slide)
    n_tiles = len(_plan(slide).grid.tiles(_plan(slide).box))
    assert [o.ok for o in outcomes] == [True] and outcomes[0].tiles_run == n_tiles
    whole = analyze_region(
        slide, Region.full(slide.shape), model=model, tasks=ALL_TASKS, cache=False
    )
    batch = got["batch"]
    assert batch.nuclei.count > 50
    # nuclei cut by the seam between blocks (analysis column 384) are kept whole, once
    seam = set(np.unique(batch.nuclei.labels[:, 383])) & set(np.unique(batch.nuclei.labels[:, 384]))
    assert seam - {0}
    _assert_same(batch, whole)


def test_distributed_run_on_loopback_equals_single_process(synthetic_slide: Path, tmp_path: Path):
    pytest.importorskip("distributed")
    import cloudpickle

    # The stand-in model lives in this test module, which spawned workers cannot import.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    model = ThresholdModel()
    got: dict[str, object] = {}
    options = BatchOptions(
        model=model, tasks=ALL_TASKS, shard_px=384, progress=False,
        formats=("geojson", "csv", "ome-tiff", "summary"),
    )  # fmt: skip
    run_batch(
        [synthetic_slide], tmp_path / "local", options,
        on_result=lambda p, r: got.setdefault("local", r),
    )  # fmt: skip
    outcomes = run_batch(
        [synthetic_slide], tmp_path / "dask", options.replace(workers=2),
        on_result=lambda p, r: got.setdefault("dask", r),
    )  # fmt: skip
    assert outcomes[0].ok, outcomes[0].error
    _assert_same(got["local"], got["dask"])
    for name in ("nuclei.geojson", "tiles.geojson", "nuclei.csv", "tiles.csv"):
        a = (tmp_path / "local" / "synthetic" / name).read_bytes()
        b = (tmp_path / "dask" / "synthetic" / name).read_bytes()
        assert a == b, name


def test_cli_skips_a_corrupt_slide_and_reports_it(
    synthetic_slide: Path, tmp_path: Path, capsys, monkeypatch
):
    import argparse

    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00garbage" * 100)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = str(tmp_path / "out")
    argv = [str(bad), str(synthetic_slide), "--out", out, "--quiet", "--tasks", "nuclei", "tiles"]
    args = parser.parse_args([*argv, "--block-px", "384"])
    args.model = ThresholdModel()
    code = run(args)
    captured = capsys.readouterr()
    assert code == 1
    assert "FAILED" in captured.out and "broken.svs" in captured.out
    assert "1 of 2 slide(s) failed" in captured.err
    summary = json.loads((tmp_path / "out" / "synthetic" / "summary.json").read_text())
    n_tiles = len(
        _plan(open_slide(synthetic_slide)).grid.tiles(_plan(open_slide(synthetic_slide)).box)
    )
    assert summary["nuclei"]["count"] > 50 and summary["tiles"]["total"] == n_tiles
    assert not (tmp_path / "out" / "broken").exists()


def test_tissue_mask_skips_glass(tmp_path: Path, monkeypatch):
    """A slide half glass: the masked-out tiles are never read and count as skipped."""
    import histolens.slide as slide_mod
    from histolens.slide import Slide

    rgb = np.full((768, 768, 3), 245, np.uint8)  # glass
    yy, xx = np.mgrid[0:370, 0:768]
    # stained top band, ending far enough above analysis row 384 (tile row 2) that the
    # one-pixel mask dilation does not reach it
    rgb[:370] = np.stack([200 + 0 * xx, 120 + (xx % 40), 170 + (yy % 30)], -1)
    slide = Slide.from_array(rgb, mpp=0.5, name="half")
    monkeypatch.setattr(slide_mod, "open_slide", lambda path, mpp=None: slide)
    got = {}
    options = BatchOptions(model=ThresholdModel(), tasks=("tiles",), progress=False)
    outcomes = run_batch(["half"], tmp_path, options, on_result=lambda p, r: got.setdefault("r", r))
    assert outcomes[0].ok, outcomes[0].error
    result = got["r"]
    size = _plan(slide).grid.size
    n, stained = math.ceil(768 / size), math.ceil(370 / size)  # tiles per side, stained tile rows
    assert outcomes[0].tiles_total == n * n and outcomes[0].tiles_run == stained * n
    assert result.provenance.tiles_skipped == (n - stained) * n
    rows = stained * size // 32  # class cells of 32 analysis px in the stained tile rows
    classes = result.tiles.classes
    assert (classes[:rows] > 0).all() and (classes[rows:] == 0).all()


@pytest.mark.slow
def test_real_model_on_a_real_slide_batch_equals_engine(wsi_dir: Path, tmp_path: Path):
    """test-tiny (torch) on a CMU-1 crop: batch == dask batch == analyze_region (to 1e-6)."""
    import torch

    torch.set_num_threads(2)
    path = wsi_dir / "CMU-1-Small-Region.svs"
    region = Region(1500, 600, 2012, 1112)
    got = {}
    options = BatchOptions(
        model="test-tiny", tasks=ALL_TASKS, region=region, tissue_mask=False, shard_px=192,
        progress=False,
    )  # fmt: skip
    outcomes = run_batch(
        [path], tmp_path, options, on_result=lambda p, r: got.setdefault("batch", r)
    )
    assert outcomes[0].ok, outcomes[0].error
    whole = analyze_region(
        open_slide(path), region, model="test-tiny", tasks=ALL_TASKS, cache=False
    )
    _assert_same(got["batch"], whole, atol=1e-6)
    # Joining a running scheduler (--scheduler ADDRESS), here a loopback cluster of 2 workers.
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        outcomes = run_batch(
            [path], tmp_path / "dask", options.replace(scheduler=cluster.scheduler_address),
            on_result=lambda p, r: got.setdefault("dask", r),
        )  # fmt: skip
    assert outcomes[0].ok, outcomes[0].error
    _assert_same(got["batch"], got["dask"], atol=1e-6)


def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_log():
    import io

    from histolens.progress import ProgressPrinter

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    log, tty = io.StringIO(), Terminal()
    for stream in (log, tty):
        p = ProgressPrinter(stream=stream, every=0.0)
        p.log("slide.svs: 10 tiles")
        p.set_total(10)  # known once the slides are planned
        for _ in range(10):
            p.update(1, "slide.svs")
        p.close()
    lines = log.getvalue().splitlines()
    assert lines[0].endswith("histolens: slide.svs: 10 tiles") and "\r" not in log.getvalue()
    assert lines[-1].split("histolens: ")[1].startswith("tiles 10/10 (")
    assert "10/10" in tty.getvalue() and "tile/s" in tty.getvalue() and "\r" in tty.getvalue()


def test_a_revised_total_does_not_restart_the_rate_clock(monkeypatch):
    """Regression: the demo revised the total on its last partial result, which restarted the
    clock, and printed millions of tiles/s."""
    import io

    from histolens import progress

    clock = iter([0.0, 1.0, 4.0, 4.0, 4.0])  # start, set_total, update, revise, update
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    log = io.StringIO()
    p = progress.ProgressPrinter(stream=log, every=0.0)
    p.set_total(10)
    p.update(6)
    p.set_total(9)
    p.update(3)
    assert log.getvalue().splitlines()[-1].split("histolens: ")[1] == "tiles 9/9 (3.0 tiles/s)"


def test_a_slide_failing_during_analysis_does_not_stop_the_others(
    synthetic_slide: Path, tmp_path: Path, monkeypatch
):
    import shutil

    from histolens.batch import _shard

    other = tmp_path / "other.tif"
    shutil.copy(synthetic_slide, other)
    real = _shard.run_shard

    def flaky(slide, *args, **kwargs):
        if slide.name == "other":
            raise RuntimeError("decoder crashed on tile (3, 4)")
        return real(slide, *args, **kwargs)

    monkeypatch.setattr(_shard, "run_shard", flaky)
    options = BatchOptions(model=ThresholdModel(), tasks=("tiles",), shard_px=384, progress=False)
    outcomes = run_batch([other, synthetic_slide], tmp_path / "out", options)
    assert [o.ok for o in outcomes] == [False, True]
    assert "RuntimeError: decoder crashed on tile (3, 4)" in outcomes[0].error
    assert (tmp_path / "out" / "synthetic" / "tiles.geojson").is_file()
    assert not (tmp_path / "out" / "other" / "summary.json").exists()


def test_options_are_checked_once_with_the_value_named():
    options = BatchOptions(tasks=["nuclei"], region="0,0,512,512", formats=["csv"], shard_px=384)
    assert options.tasks == ("nuclei",) and options.formats == ("csv",)
    assert options.region == Region(0, 0, 512, 512) and not options.distributed
    assert options.replace(workers=2).distributed and options.workers == 0
    for bad, words in (
        (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (dict(shard_px=1.5), "shard_px must be an integer >= 1, got 1.5"),
        (dict(tasks=("nuclei", "cells")), "unknown: cells"),
        (dict(formats=("pdf",)), "unknown: pdf"),
        (dict(mpp=float("inf")), "mpp must be a level-0 um/px"),
        (dict(precision="fp8"), "precision must be one of auto"),
        (dict(workers=2, scheduler="tcp://10.0.0.5:8786"), "not both"),
        (dict(region="0,0,inf,inf"), "four integers"),
    ):
        with pytest.raises(ValueError, match=words):
            BatchOptions(**bad)
    with pytest.raises(TypeError, match="no option"):
        options.replace(block_px=256)


def test_shard_px_flag_and_its_old_name(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for flag in ("--shard-px", "--block-px"):
        args = parser.parse_args(["s.svs", "--out", "o", flag, "384"])
        assert args.shard_px == 384
    assert "--block-px" not in parser.format_help() and "shard" in parser.format_help()
    args = parser.parse_args(["s.svs", "--out", "o", "--region", "1,2,3"])
    assert run(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "four integers" in err


def test_a_cluster_made_for_the_run_is_closed_on_ctrl_c(monkeypatch):
    from histolens import _cluster

    closed = []

    class Closing:
        def __init__(self, name: str) -> None:
            self.name = name

        def close(self) -> None:
            closed.append(self.name)

    monkeypatch.setattr(
        _cluster, "_local_cluster", lambda n: (Closing("cluster"), Closing("client"))
    )
    with pytest.raises(KeyboardInterrupt), _cluster.dask_client(workers=2) as client:
        assert client.name == "client"
        raise KeyboardInterrupt
    assert closed == ["client", "cluster"]
    mine = Closing("mine")
    with _cluster.dask_client(workers=2, client=mine) as client:
        assert client is mine
    with _cluster.dask_client() as client:
        assert client is None
    assert closed == ["client", "cluster"]  # a caller's client stays open
