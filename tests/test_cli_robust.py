"""Bad values on the command line are one line and exit 2; ``histolens nuclei`` survives bad
images, writes atomically and streams its label TIFF (issue 17)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from histolens.cli import console


def _one_line_exit_2(capsys, argv: list[str]) -> str:
    try:
        code = console(argv)
    except SystemExit as exc:  # argparse's own exit
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["analyze", "s.svs", "--out", "o", "--region", "0,0,inf,inf"], "four integers"),
        (["analyze", "s.svs", "--out", "o", "--mpp", "inf"], "positive finite"),
        (["analyze", "s.svs", "--out", "o", "--mpp", "1e300"], "not a microscope pixel size"),
        (["analyze", "s.svs", "--out", "o", "--workers", "-1"], "integer >= 0"),
        (["analyze", "s.svs", "--out", "o", "--block-px", "0"], "integer >= 1"),
        (["nuclei", "a.png", "--out", "o", "--mpp", "inf"], "positive finite"),
        (["nuclei", "a.png", "--out", "o", "--mpp", "1e-300"], "not a microscope pixel size"),
        (["nuclei", "a.png", "--out", "o", "--mpp", "1e300"], "not a microscope pixel size"),
        (["nuclei", "a.png", "--out", "o", "--mpp", "nan"], "positive finite"),
        (["nuclei", "a.png", "--out", "o", "--mpp", "0.25", "--threads", "0"], "integer >= 1"),
        (["evaluate", "nuclei", "--images", "i", "--pred", "p", "--mpp", "0"], "positive"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(capsys, argv, words):
    line = _one_line_exit_2(capsys, argv)
    assert words in line


def test_a_malformed_scheduler_address_is_one_line(capsys, tmp_path):
    argv = ["analyze", "s.svs", "--out", str(tmp_path), "--model", "test-tiny"]
    line = _one_line_exit_2(capsys, [*argv, "--scheduler", "notaurl"])
    assert "notaurl" in line and "tcp://" in line


# --------------------------------------------------------------------------- histolens nuclei
def _crop(wsi_dir: Path, h: int, w: int) -> np.ndarray:
    from histolens.slide import open_slide

    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as slide:
        return np.asarray(slide.levels[0][1400 : 1400 + h, 500 : 500 + w])


def _bomb_jpeg(path: Path) -> None:
    """A small JPEG whose header declares 20000 x 20000 px (Pillow's bomb check reads it)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 120, 170)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (20000).to_bytes(2, "big") * 2  # height, width
    path.write_bytes(bytes(data))


def test_nuclei_goes_on_after_bad_images_and_names_them(wsi_dir, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from histolens import nuclei

    # TIFFs read lazily, as large ones are: the damaged tile fails inside the engine's read
    monkeypatch.setattr(nuclei, "EAGER_READ_SAMPLES", 0)

    good = tmp_path / "good.png"
    Image.fromarray(_crop(wsi_dir, 200, 240)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    bomb = tmp_path / "bomb.jpg"
    _bomb_jpeg(bomb)
    tiff = tmp_path / "cut.tif"
    tifffile.imwrite(tiff, _crop(wsi_dir, 600, 600), tile=(256, 256), compression="zlib")
    tiff.write_bytes(tiff.read_bytes()[:-20000])  # the last tiles' data is gone
    out = tmp_path / "out"
    argv = ["nuclei", str(truncated), str(bomb), str(good), str(tiff), "--mpp", "0.5"]
    code = console([*argv, "--out", str(out), "--model", "test-tiny", "--no-tta"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "Traceback" not in captured.err
    assert "3 of 4 image(s) failed" in captured.err
    for bad in (truncated, bomb, tiff):
        assert str(bad) in captured.err
    assert "truncated" in captured.err and "tiled TIFF" in captured.err  # the bomb's fix
    assert sorted(p.name for p in out.iterdir()) == ["good.csv", "good.tif"]  # nothing else
    assert "good.png: " in captured.out


def test_nuclei_files_appear_only_when_complete(wsi_dir, tmp_path, monkeypatch):
    from histolens import nuclei

    img = tmp_path / "img.tif"
    tifffile.imwrite(img, _crop(wsi_dir, 700, 600))
    calls = {"n": 0}
    real = nuclei._input_labels

    def dies_midway(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if killed while the label TIFF is being written
        return real(*args)

    monkeypatch.setattr(nuclei, "_input_labels", dies_midway)
    with nuclei.image_slide(img, mpp=0.5) as slide, pytest.raises(KeyboardInterrupt):
        nuclei.write_nuclei(slide, tmp_path / "out" / "img", mpp=0.5, model="test-tiny")
    assert list((tmp_path / "out").iterdir()) == []  # no 0-byte img.tif, no temporary left


def test_streamed_labels_equal_the_in_memory_ones_with_the_real_model(
    wsi_dir, tmp_path, monkeypatch, default_model
):
    """histolens-default on a real crop larger than one output tile (2 x 2 tiles of 512),
    read lazily tile by tile as a large TIFF is."""
    from histolens import nuclei
    from histolens.nuclei import image_slide, segment_nuclei, write_nuclei

    monkeypatch.setattr(nuclei, "EAGER_READ_SAMPLES", 0)

    image = _crop(wsi_dir, 600, 560)
    path = tmp_path / "crop.tif"
    tifffile.imwrite(path, image, tile=(256, 256), compression="zlib")
    model = default_model
    labels, table = segment_nuclei(image, mpp=0.5, model=model, precision="fp32")
    with image_slide(path, mpp=0.5) as slide:
        assert slide.levels[0].chunksize[:2] == (256, 256)  # the file's tiles, read lazily
        n = write_nuclei(slide, tmp_path / "out" / "crop", mpp=0.5, model=model, precision="fp32")
    written = tifffile.imread(tmp_path / "out" / "crop.tif")
    np.testing.assert_array_equal(written, labels)
    assert n == len(table) > 20
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "out" / "crop.csv"), table)


def test_an_image_too_large_for_the_model_grid_is_refused_before_any_work(tmp_path):
    import dask.array as da

    from histolens.nuclei import write_nuclei
    from histolens.slide import Slide

    huge = Slide.from_array(da.zeros((60000, 60000, 3), np.uint8, chunks=4096), mpp=0.5)
    with pytest.raises(ValueError, match="more than histolens nuclei holds"):
        write_nuclei(huge, tmp_path / "huge", mpp=0.5, model="test-tiny")
    assert not (tmp_path / "huge.tif").exists()
