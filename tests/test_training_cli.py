"""``histolens nuclei`` / ``histolens evaluate nuclei`` end to end, and the classical baseline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from histolens.nuclei import NUCLEI_TABLE_COLUMNS, labels_to_input_grid
from histolens.training.evaluate import classical_nuclei, score_pair


def _disk_image(shape=(200, 200), n=12, seed=0):
    """H&E-like synthetic tile: dark purple disks (nuclei) on pink, and their instance labels."""
    rng = np.random.default_rng(seed)
    inst = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    k = 0
    while k < n:
        cy, cx, r = (
            rng.integers(12, shape[0] - 12),
            rng.integers(12, shape[1] - 12),
            rng.integers(5, 9),
        )
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if (inst[np.pad(disk, 0)] > 0).any() or (
            inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= (r + 3) ** 2] > 0
        ).any():
            continue
        k += 1
        inst[disk] = k
    img = np.empty((*shape, 3), np.uint8)
    img[:] = (235, 180, 210)
    img[inst > 0] = (70, 40, 130)
    img = np.clip(img.astype(int) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
    return img, inst


def test_classical_baseline_finds_separate_disks():
    img, inst = _disk_image()
    pred = classical_nuclei(img, mpp=0.5)
    s = score_pair(inst, pred.astype(np.int64))
    assert s["dice"] > 0.9 and s["pq"] > 0.8, s


def test_labels_to_input_grid_inverts_a_downsample_of_two():
    lab = np.array([[1, 2], [3, 0]], np.uint32)
    up = labels_to_input_grid(lab, 2.0, (0, 0), (4, 5))
    assert up.shape == (4, 5)
    assert up[:2, :2].tolist() == [[1, 1], [1, 1]] and up[3, 3] == 0 and up[0, 3] == 2
    assert (up[:, 4] == 0).all()  # beyond the label array


def test_nuclei_cli_writes_labels_and_table(tmp_path):
    from histolens.cli import main

    img, _ = _disk_image((150, 170))
    src = tmp_path / "tile.tif"
    tifffile.imwrite(src, img)
    out = tmp_path / "out"
    assert (
        main(["nuclei", str(src), "--mpp", "0.25", "--out", str(out), "--model", "test-tiny"]) == 0
    )
    labels = tifffile.imread(out / "tile.tif")
    assert labels.shape == (150, 170) and labels.dtype == np.uint32
    table = pd.read_csv(out / "tile.csv")
    assert tuple(table.columns) == NUCLEI_TABLE_COLUMNS
    # Every row is a label present in the image, with its pixel area; and vice versa.
    ids = set(np.unique(labels[labels > 0]).tolist())
    assert set(table["label"]) == ids
    for _, r in table.head(5).iterrows():
        assert (labels == r["label"]).sum() == r["area_px"]
        assert r["area_um2"] == pytest.approx(r["area_px"] * 0.25 * 0.25)


def test_evaluate_cli_scores_predictions_and_baseline(tmp_path, capsys):
    from histolens.cli import main

    imgs, labs, preds = (tmp_path / d for d in ("images", "labels", "pred"))
    for d in (imgs, labs, preds):
        d.mkdir()
    for i in range(2):
        img, inst = _disk_image(seed=i)
        tifffile.imwrite(imgs / f"t{i}.tif", img)
        tifffile.imwrite(labs / f"t{i}.tif", inst.astype(np.uint16))
        tifffile.imwrite(preds / f"t{i}.tif", inst.astype(np.uint32))  # perfect predictions
    evaluate = ["evaluate", "nuclei", "--images", str(imgs), "--labels", str(labs), "--mpp", "0.5"]
    assert main([*evaluate, "--pred", str(preds)]) == 0
    out = capsys.readouterr().out
    assert "mean  dice 1.0000  aji 1.0000  pq 1.0000" in out
    js = tmp_path / "b.json"
    assert main([*evaluate, "--baseline", "--json", str(js)]) == 0
    import json

    mean = json.loads(js.read_text())["mean"]
    assert 0.7 < mean["pq"] <= 1.0


def test_evaluate_on_a_real_monuseg_tile_baseline(shared_data):
    """The baseline on one real labelled tile: plausible, far from perfect (a sanity anchor)."""
    from histolens.nuclei import read_rgb

    mon = shared_data / "monuseg" / "train"
    if not mon.is_dir():
        pytest.skip(f"{mon} is absent")
    name = "TCGA-B0-5710-01Z-00-DX1"
    from PIL import Image

    img = read_rgb(mon / "images" / f"{name}.tif")
    true = np.asarray(Image.open(mon / "labels" / f"{name}.png")).astype(np.int64)
    s = score_pair(true, classical_nuclei(img, mpp=0.25).astype(np.int64))
    assert 0.6 < s["dice"] < 0.95 and 0.3 < s["pq"] < 0.8, s


def _write_aperio_xml(path, labels: np.ndarray) -> None:
    """Outlines of ``labels`` in MoNuSeg's Aperio ImageScope XML (pixel-index X, Y)."""
    from histolens.export import labels_to_polygons

    regions = []
    for i, rings in labels_to_polygons(labels, tolerance=0).items():
        ring = max(rings, key=len)  # GeoJSON rings use the pixel-edge frame: centres at +0.5
        vertices = "".join(f'<Vertex X="{x - 0.5:.2f}" Y="{y - 0.5:.2f}" Z="0"/>' for x, y in ring)
        regions.append(
            f'<Region Id="{i}" Type="0"><Attributes/><Vertices>{vertices}</Vertices></Region>'
        )
    path.write_text(
        '<?xml version="1.0"?><Annotations MicronsPerPixel="0.252"><Annotation Id="1"><Regions>'
        "<RegionAttributeHeaders/>" + "".join(regions) + "</Regions></Annotation></Annotations>"
    )


def test_aperio_xml_outlines_rasterise_back_to_the_real_monuseg_labels(shared_data, tmp_path):
    """MoNuSeg ships labels as XML outlines: a real tile's labels -> XML -> labels again."""
    from PIL import Image

    from histolens.training.evaluate import read_aperio_xml

    mon = shared_data / "monuseg" / "train"
    if not mon.is_dir():
        pytest.skip(f"{mon} is absent")
    true = np.asarray(Image.open(mon / "labels" / "TCGA-B0-5710-01Z-00-DX1.png")).astype(np.int64)
    _write_aperio_xml(tmp_path / "t.xml", true)
    back = read_aperio_xml(tmp_path / "t.xml", true.shape).astype(np.int64)
    s = score_pair(true, back)
    assert s["n_pred"] == s["n_true"] == len(np.unique(true)) - 1
    assert s["aji"] > 0.97 and s["pq"] > 0.97, s


def test_evaluate_reads_xml_labels_and_names_bad_ones(tmp_path, capsys):
    from histolens.cli import main

    imgs, labs = tmp_path / "images", tmp_path / "labels"
    imgs.mkdir(), labs.mkdir()
    img, inst = _disk_image(seed=3)
    tifffile.imwrite(imgs / "t.tif", img)
    _write_aperio_xml(labs / "t.xml", inst)
    tifffile.imwrite(tmp_path / "pred.tif", inst.astype(np.uint32))
    (tmp_path / "pred").mkdir()
    tifffile.imwrite(tmp_path / "pred" / "t.tif", inst.astype(np.uint32))
    args = ["evaluate", "nuclei", "--images", str(imgs), "--labels", str(labs), "--mpp", "0.5"]
    assert main([*args, "--pred", str(tmp_path / "pred")]) == 0
    assert "mean  dice 1.0000" in capsys.readouterr().out
    (labs / "t.xml").write_text("<Annotations><Regions>")  # truncated
    with pytest.raises(ValueError, match=r"t\.xml: not a readable XML file"):
        main([*args, "--pred", str(tmp_path / "pred")])
    (labs / "t.xml").write_text("<Annotations/>")
    with pytest.raises(ValueError, match=r"t\.xml: no Region"):
        main([*args, "--pred", str(tmp_path / "pred")])


def test_train_tiles_writes_a_new_head_that_loads(tmp_path, capsys):
    from PIL import Image

    from histolens.cli import main
    from histolens.models import create_model

    rng = np.random.default_rng(0)
    for cls, colour in (("necrosis", (120, 60, 40)), ("stroma", (240, 150, 200))):
        d = tmp_path / "tiles" / cls
        d.mkdir(parents=True)
        for i in range(6):
            img = np.clip(np.array(colour) + rng.integers(-40, 40, (64, 64, 3)), 0, 255).astype(
                np.uint8
            )
            Image.fromarray(img).save(d / f"{i}.png")
    out = tmp_path / "mine.safetensors"
    assert (
        main(
            [
                "train",
                "tiles",
                "--images",
                str(tmp_path / "tiles"),
                "--out",
                str(out),
                "--model",
                "test-tiny",
                "--folds",
                "2",
            ]
        )
        == 0
    )
    assert "grouped 2-fold CV" in capsys.readouterr().out
    model = create_model("test-tiny", weights=out)
    assert model.card.tissue_classes == ("necrosis", "stroma")
    assert model.card.weights_sha256 and (tmp_path / "mine.card.json").is_file()
    probs = model.predict_tiles(np.zeros((1, 64, 64, 3), np.uint8), tasks=("tiles",))["tile_probs"]
    assert probs.shape[-1] == 2


def test_console_prints_the_error_not_a_traceback(tmp_path):
    import subprocess
    import sys

    (tmp_path / "images").mkdir()
    cmd = [sys.executable, "-m", "histolens.cli", "evaluate", "nuclei", "--mpp", "0.25"]
    cmd += ["--images", str(tmp_path / "images"), "--labels", str(tmp_path / "missing")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "histolens: error: --labels" in run.stderr and "missing is not a folder" in run.stderr
    assert "Traceback" not in run.stderr


def test_evaluate_runs_the_model_with_tta_like_histolens_nuclei(tmp_path, capsys):
    from histolens.cli import main

    imgs, labs = tmp_path / "images", tmp_path / "labels"
    imgs.mkdir(), labs.mkdir()
    img, inst = _disk_image(shape=(96, 96), n=4, seed=5)
    tifffile.imwrite(imgs / "t.tif", img)
    tifffile.imwrite(labs / "t.tif", inst.astype(np.uint16))
    args = ["evaluate", "nuclei", "--images", str(imgs), "--labels", str(labs), "--mpp", "0.5"]
    args += ["--model", "test-tiny", "--threads", "1"]
    assert main(args) == 0
    assert "# model test-tiny with TTA on 1 images" in capsys.readouterr().out
    assert main([*args, "--no-tta"]) == 0
    out = capsys.readouterr().out
    assert "# model test-tiny on 1 images" in out and "mean  dice" in out


def test_nuclei_cli_with_the_default_model_on_real_consep_patches(shared_data, tmp_path):
    """``histolens nuclei`` (the real default model, TTA on as shipped) on held-out CoNSeP
    patches, then ``histolens evaluate nuclei --pred`` on its files: the model's instances
    score above the classical baseline's on the same patches."""
    import json

    from histolens.cli import main

    consep = shared_data / "consep"
    stems = ("train_13_000", "train_13_003", "train_13_006")  # source tile 13 is held out
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    for stem in stems:
        src = consep / "images" / "train" / f"{stem}.jpg"
        if not src.is_file():
            pytest.skip(f"{src} is absent")
        (images / src.name).symlink_to(src)
        (labels / f"{stem}.png").symlink_to(consep / "inst" / "train" / f"{stem}.png")
    out = tmp_path / "out"
    paths = [str(images / f"{s}.jpg") for s in stems]
    assert main(["nuclei", *paths, "--mpp", "0.25", "--out", str(out), "--threads", "1"]) == 0
    for stem in stems:
        written = tifffile.imread(out / f"{stem}.tif")
        table = pd.read_csv(out / f"{stem}.csv")
        assert written.shape == (256, 256) and len(table) > 10
        assert set(table["label"]) == set(np.unique(written)) - {0}
        assert set(table["type"]) <= {"other", "inflammatory", "epithelial", "spindle-shaped"}
    evaluate = ["evaluate", "nuclei", "--images", str(images), "--labels", str(labels)]
    evaluate += ["--mpp", "0.25"]
    assert main([*evaluate, "--pred", str(out), "--json", str(tmp_path / "model.json")]) == 0
    assert main([*evaluate, "--baseline", "--json", str(tmp_path / "base.json")]) == 0
    model = json.loads((tmp_path / "model.json").read_text())["mean"]
    base = json.loads((tmp_path / "base.json").read_text())["mean"]
    assert model["pq"] > base["pq"] and model["dice"] > 0.6, (model, base)
