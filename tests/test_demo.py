"""The main job, headless: the packaged sample slide analysed and written to files + a PNG."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from histolens.cli import main


def test_headless_demo_writes_exports_and_png(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--headless",
            "--out",
            str(out),
            "--model",
            "test-tiny",
            "--region",
            "1000,600,1512,1112",
        ]
    )
    assert code == 0
    for name in (
        "nuclei.geojson",
        "nuclei.csv",
        "tiles.geojson",
        "tiles.csv",
        "summary.json",
        "overview.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["region_level0_px"] == {"y0": 1000, "x0": 600, "y1": 1512, "x1": 1112}
    assert summary["model"]["name"] == "test-tiny"
    png = np.asarray(Image.open(out / "overview.png"))
    assert png.ndim == 3 and png.shape[0] >= 256 and png.std() > 5  # a real picture, not blank
    printed = capsys.readouterr().out
    assert "CMU-1-Small-Region.svs" in printed and "wrote" in printed


def test_help_lists_every_job(capsys):
    assert main([]) == 0
    text = capsys.readouterr().out
    for job in ("view", "demo", "analyze", "nuclei", "evaluate", "train", "models"):
        assert job in text
