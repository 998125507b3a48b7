"""The batch run with the real default model on dask, and its failure paths (issue 17)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from histolens import Region
from histolens.batch import BatchOptions, run_batch

#: A tissue-rich crop of CMU-1-Small-Region (level-0 px): 4 shards at shard_px=256.
REGION = Region(1500, 600, 2012, 1112)


def _crop(wsi_dir: Path, size: int = 256) -> np.ndarray:
    from histolens.slide import open_slide

    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as slide:
        return np.asarray(slide.levels[0][1500 : 1500 + size, 600 : 600 + size])


def test_the_real_model_crosses_the_scheduler_after_it_has_run(wsi_dir: Path, default_model):
    """A used model holds inference caches; dask's own message encoder must take it, and the
    parcel the batch ships must give the very same predictions after unpacking."""
    from distributed.protocol import deserialize, dumps, serialize
    from distributed.protocol.serialize import Serialize

    from histolens import _parcel

    tiles = _crop(wsi_dir)[None]
    before = default_model.predict_tiles(tiles, tasks=("nuclei",), precision="fp32")
    assert default_model.__dict__["_inference_copies"]  # the cache that used to break msgpack
    dumps({"op": "update", "data": Serialize(default_model)})  # raised TypeError (torch.dtype)
    copy = deserialize(*serialize(default_model, serializers=("dask", "pickle")))
    assert "_inference_copies" not in copy.__dict__ or all(
        isinstance(k, str) for k in copy.__dict__["_inference_copies"]
    )

    parcel = _parcel.pack_model(default_model)
    assert isinstance(parcel.blob, bytes) and len(parcel.token) == 64
    _parcel._UNPACKED.clear()  # as in a fresh worker process
    shipped = _parcel.unpack_model(parcel)
    assert shipped is not default_model and _parcel.unpack_model(parcel) is shipped
    assert "_inference_copies" not in shipped.__dict__  # caches stay home
    after = shipped.predict_tiles(tiles, tasks=("nuclei",), precision="fp32")
    for key in ("nuclei_prob", "hv", "type_prob"):
        np.testing.assert_array_equal(before[key], after[key])


def test_two_dask_workers_with_the_real_default_model_equal_one_process(
    wsi_dir: Path, tmp_path: Path
):
    """``histolens analyze --workers 2`` with histolens-default on a real crop: the same nuclei
    as the single-process run (it used to hang: the model did not serialise). ~25 s on a
    loaded 2-core machine, most of it starting the two worker processes."""
    path = wsi_dir / "CMU-1-Small-Region.svs"
    got: dict[str, object] = {}
    options = BatchOptions(
        model=None, tasks=("nuclei",), region=REGION, tissue_mask=False, shard_px=256,
        precision="fp32", progress=False, formats=("geojson", "csv"),
    )  # fmt: skip
    t0 = time.perf_counter()
    local = run_batch(
        [path], tmp_path / "one", options, on_result=lambda p, r: got.setdefault("one", r)
    )
    t1 = time.perf_counter()
    dask = run_batch(
        [path], tmp_path / "two", options.replace(workers=2),
        on_result=lambda p, r: got.setdefault("two", r),
    )  # fmt: skip
    t2 = time.perf_counter()
    print(f"single process {t1 - t0:.1f} s, 2 dask workers {t2 - t1:.1f} s")
    assert local[0].ok and dask[0].ok, (local[0].error, dask[0].error)
    a, b = got["one"].nuclei, got["two"].nuclei
    assert a.count > 20 and a.count == b.count
    np.testing.assert_array_equal(a.labels, b.labels)
    assert list(a.features["class_name"]) == list(b.features["class_name"])
    np.testing.assert_allclose(
        a.features[["centroid_y", "centroid_x", "area_um2"]],
        b.features[["centroid_y", "centroid_x", "area_um2"]],
    )
    # float32 sums depend on which blocks share a model call (last-bit differences)
    np.testing.assert_allclose(a.features["probability"], b.features["probability"], atol=1e-5)
    for name in ("nuclei.geojson", "nuclei.csv"):
        assert (tmp_path / "two" / "CMU-1-Small-Region" / name).stat().st_size > 0


def test_a_slide_without_mpp_is_reported_not_a_type_error(tmp_path: Path):
    import tifffile

    path = tmp_path / "no-mpp.tif"
    tifffile.imwrite(path, np.full((300, 300, 3), 200, np.uint8), tile=(256, 256))
    with pytest.warns(UserWarning, match="no pixel size"):
        outcomes = run_batch(
            [path], tmp_path / "out", BatchOptions(model="test-tiny", progress=False)
        )
    assert not outcomes[0].ok
    assert outcomes[0].error.startswith("SlideError: ")
    assert str(path) in outcomes[0].error and "--mpp" in outcomes[0].error
    assert not (tmp_path / "out" / "no-mpp").exists()


def test_a_slide_whose_writing_fails_leaves_no_folder(wsi_dir: Path, tmp_path: Path, monkeypatch):
    from histolens import export

    def broken(*args, **kwargs):
        out = Path(args[1])
        out.mkdir(parents=True, exist_ok=True)
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_result", broken)
    options = BatchOptions(model="test-tiny", region=Region(0, 0, 256, 256), progress=False)
    outcomes = run_batch([wsi_dir / "CMU-1-Small-Region.svs"], tmp_path, options)
    assert "disk full" in outcomes[0].error
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_scheduler_fails_fast_in_one_line(tmp_path: Path):
    import socket

    with socket.socket() as s:  # a free local port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address, words in (
        ("notaurl", "is not a scheduler address"),
        (f"tcp://127.0.0.1:{port}", "no dask scheduler answers"),
    ):
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match=words) as err:
            options = BatchOptions(model="test-tiny", scheduler=address, progress=False)
            run_batch(["x.svs"], tmp_path, options)
        assert time.perf_counter() - t0 < 20  # not the 60 s hang of a Client's retries
        assert "\n" not in str(err.value) and "tcp://" in str(err.value)


def test_a_port_that_is_no_scheduler_fails_in_one_line(tmp_path: Path):
    """Something answers, but with garbage (a web server, a proxy): no Client is built."""
    import socket
    import threading

    from histolens._cluster import check_scheduler

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer_garbage() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"\xff" * 64 + b"HTTP/1.1 400 Bad Request\r\n\r\n")

    threading.Thread(target=answer_garbage, daemon=True).start()
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=f"no dask scheduler answers at tcp://127.0.0.1:{port}"):
        check_scheduler(f"tcp://127.0.0.1:{port}", timeout=3)
    assert time.perf_counter() - t0 < 15
    server.close()
