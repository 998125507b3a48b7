"""Taught tile classes (histolens.teach): training, grouped CV, classification, files, batch."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from histolens.export._summary import summary_dict
from histolens.region import Region
from histolens.result import Provenance, RegionResult, TileClassResult
from histolens.teach import (
    TileClassifier,
    as_batch_writer,
    cells_region,
    classifier_paths,
    classify_result,
    examples_from_marks,
    global_cells,
    grouped_cv_accuracy,
    load_tile_classifier,
    lookup_cells,
    spatial_groups,
    train_tile_classifier,
)

CARD = {"name": "toy-backbone", "weights_sha256": "ab" * 32}
NAMES, COLORS = ("fat", "muscle", "gland"), ("#ffff00", "#ff0000", "#00aa00")


def toy_result(*, dim: int = 16, shape=(12, 18), origin_cells=(40, 70), seed: int = 0):
    """A 12 x 18 cell grid (cell 64 level-0 px) in three vertical bands of separable
    embeddings; the rightmost column is glass (class 0, zero embedding)."""
    rng = np.random.default_rng(seed)
    gh, gw = shape
    truth = np.repeat((np.arange(gw) * 3 // gw)[None, :], gh, axis=0)
    centres = rng.normal(0, 3, (3, dim)).astype(np.float32)
    emb = centres[truth] + rng.normal(0, 1, (gh, gw, dim)).astype(np.float32)
    classes = np.ones(shape, np.int32)  # the model's own (meaningless) class
    classes[:, -1] = 0
    emb[:, -1] = 0
    cell = 64.0
    origin = (origin_cells[0] * cell, origin_cells[1] * cell)
    tiles = TileClassResult(
        classes, np.ones((*shape, 1), np.float32), emb, cell, origin, ("model",), ("#808080",)
    )
    region = Region(
        int(origin[0]), int(origin[1]), int(origin[0] + gh * cell), int(origin[1] + gw * cell)
    )
    prov = Provenance(
        slide_path="", slide_name="toy", region=region, level=0, level_downsample=1.0,
        slide_mpp=0.5, mpp_source="user", analysis_mpp=0.5, model_name=CARD["name"],
        model_card=dict(CARD), device="cpu", precision="fp32", started="2026-01-01T00:00:00",
    )  # fmt: skip
    return RegionResult(region, 0.5, None, tiles, [], prov), truth


def marks_from(truth: np.ndarray, per_class: int, seed: int = 1) -> np.ndarray:
    """``per_class`` random example cells per class (label = class + 1), glass column excluded."""
    rng = np.random.default_rng(seed)
    marks = np.zeros(truth.shape, np.int32)
    for k in range(3):
        ys, xs = np.nonzero(truth[:, :-1] == k)
        pick = rng.choice(len(ys), per_class, replace=False)
        marks[ys[pick], xs[pick]] = k + 1
    return marks


def taught(per_class: int = 8, **kw):
    result, truth = toy_result(**kw)
    examples, outside = examples_from_marks(result.tiles, marks_from(truth, per_class))
    assert outside == 0
    return result, truth, train_tile_classifier(examples, NAMES, COLORS, CARD, cv=False)


def test_examples_live_on_the_global_grid_and_skip_glass():
    result, truth = toy_result()
    assert global_cells(result.tiles) == (40, 70)
    marks = np.zeros(truth.shape, np.int32)
    marks[2, 3] = 2
    marks[5, -1] = 1  # glass: no embedding
    examples, outside = examples_from_marks(result.tiles, marks)
    assert outside == 1
    assert examples.cells.tolist() == [[42, 73]]
    assert examples.labels.tolist() == [1]
    np.testing.assert_array_equal(examples.embeddings[0], result.tiles.embeddings[2, 3])


def test_taught_classes_follow_the_examples_and_keep_glass_empty():
    result, truth, clf = taught()
    out = classify_result(result, clf)
    tiles = out.tiles
    assert tiles.class_names == NAMES and tiles.class_colors == COLORS
    assert (tiles.classes[:, -1] == 0).all()  # glass stays unpainted
    inside = tiles.classes[:, :-1] - 1
    assert (inside == truth[:, :-1]).mean() > 0.95
    assert tiles.probabilities.shape == (*truth.shape, 3)
    assert result.tiles.class_names == ("model",)  # the analysed result is left as it was


def test_confidence_threshold_leaves_unsure_cells_unpainted():
    result, _truth, clf = taught()
    probs = clf.probabilities(result.tiles.embeddings[:, :-1].reshape(-1, 16)).max(1)
    threshold = float(np.median(probs))
    out = clf.classify(result.tiles, min_confidence=threshold)
    unsure = (out.tiles if hasattr(out, "tiles") else out).classes[:, :-1] == 0
    assert unsure.sum() == (probs < threshold).sum()


def test_bad_teaching_input_is_refused_with_a_reason():
    result, truth = toy_result()
    examples, _ = examples_from_marks(result.tiles, marks_from(truth, 4))
    with pytest.raises(ValueError, match="at least 2 classes"):
        train_tile_classifier(examples, NAMES[:1], COLORS[:1], CARD)
    only_two = examples_from_marks(
        result.tiles, np.where(marks_from(truth, 4) == 3, 0, marks_from(truth, 4))
    )[0]
    with pytest.raises(ValueError, match="'gland'"):
        train_tile_classifier(only_two, NAMES, COLORS, CARD)


def test_grouped_cv_waits_for_five_examples_and_groups_neighbours():
    cells = np.array([[0, 0], [3, 3], [0, 4], [7, 7], [8, 8]])
    groups = spatial_groups(cells, size=4)
    assert groups[0] == groups[1] and len({groups[0], groups[2], groups[3], groups[4]}) == 4
    result, truth = toy_result()
    few, _ = examples_from_marks(result.tiles, marks_from(truth, 4))
    assert grouped_cv_accuracy(few, 3) is None
    enough, _ = examples_from_marks(result.tiles, marks_from(truth, 10))
    acc = grouped_cv_accuracy(enough, 3)
    assert acc is not None and acc > 0.8


def test_save_load_round_trip_gives_the_same_map(tmp_path: Path):
    result, _truth, clf = taught()
    written = clf.save(tmp_path / "skin.safetensors")
    weights, card_path = classifier_paths(written)
    assert weights.is_file() and card_path.is_file()
    card = json.loads(card_path.read_text())
    assert card["class_names"] == list(NAMES) and card["class_colors"] == list(COLORS)
    assert card["backbone"] == {
        "name": "toy-backbone",
        "weights_sha256": "ab" * 32,
        "embed_dim": 16,
    }
    assert card["examples_per_class"] == {"fat": 8, "muscle": 8, "gland": 8}
    assert card["created"] and "grouped_cv_accuracy" in card and card["min_confidence"] == 0.0
    back = load_tile_classifier(card_path)  # either file's path works
    a = classify_result(result, clf, min_confidence=0.6).tiles
    b = classify_result(result, back, min_confidence=0.6).tiles
    np.testing.assert_array_equal(a.classes, b.classes)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)


def test_file_for_384_wide_embeddings_and_20_classes_is_small(tmp_path: Path):
    rng = np.random.default_rng(0)
    clf = TileClassifier(
        tuple(f"class {i}" for i in range(20)), ("#000000",) * 20,
        rng.normal(size=(20, 384)).astype(np.float32), np.zeros(20, np.float32),
        "big", "cd" * 32, (5,) * 20,
    )  # fmt: skip
    weights, card = classifier_paths(clf.save(tmp_path / "big"))
    assert weights.stat().st_size + card.stat().st_size < 1_000_000


def test_corrupt_or_foreign_files_are_refused_and_nothing_half_written(tmp_path: Path):
    result, _truth, clf = taught()
    weights, card = classifier_paths(clf.save(tmp_path / "a.safetensors"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_tile_classifier(tmp_path / "missing.safetensors")
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the card"):
        load_tile_classifier(weights)
    card.write_text("{not json")
    with pytest.raises(ValueError, match="not a usable histolens tile classifier"):
        load_tile_classifier(weights)
    # A failing save leaves neither a temporary file nor a half file behind.
    blocker = tmp_path / "sub"
    blocker.write_text("a file where a folder is needed")
    with pytest.raises(OSError):
        clf.save(blocker / "b.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.card.json", "a.safetensors", "sub"]


def test_other_backbone_or_width_is_refused_naming_both():
    result, _truth, clf = taught()
    other = replace(
        result,
        provenance=replace(
            result.provenance, model_card={"name": "uni", "weights_sha256": "ef" * 32}
        ),
    )
    with pytest.raises(ValueError, match="'toy-backbone'.*'uni'"):
        classify_result(other, clf)
    wide, _ = toy_result(dim=32)
    with pytest.raises(ValueError, match="16-wide.*32-wide"):
        clf.classify(wide.tiles)


def test_batch_writer_checks_the_model_first_and_classifies_before_writing(tmp_path: Path):
    result, _truth, clf = taught()
    path = clf.save(tmp_path / "c")
    seen = []
    write = as_batch_writer(path, CARD, ("nuclei", "tiles"), lambda r, *a, **k: seen.append(r))
    write(result, tmp_path)
    assert seen[0].tiles.class_names == NAMES
    with pytest.raises(ValueError, match="'tiles' task"):
        as_batch_writer(path, CARD, ("nuclei",), print)
    with pytest.raises(ValueError, match="'uni'"):
        as_batch_writer(path, {"name": "uni", "weights_sha256": "x"}, ("tiles",), print)


def test_analyze_command_refuses_a_bad_classifier_in_one_line(tmp_path: Path, capsys):
    from histolens.cli import console
    from histolens.slide import sample_slide_path

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    (tmp_path / "bad.card.json").write_text("{}")
    out = tmp_path / "out"
    args = ["analyze", str(sample_slide_path()), "--out", str(out), "--region", "0,0,256,256"]
    assert console([*args, "--tile-classifier", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.safetensors" in err[0] and "Teach" in err[0], err
    assert not out.exists() or not any(out.iterdir())
    result, _truth, clf = taught()
    other = clf.save(tmp_path / "toy")  # taught on another backbone than the default model
    assert console([*args, "--tile-classifier", str(other), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'toy-backbone'" in err[0] and "'histolens-default'" in err[0], err


def test_lookup_cells_and_their_region_on_the_global_grid():
    result, _truth = toy_result()
    cells = np.array([[41, 72], [41, 87], [10, 10]])  # tissue, glass column, outside
    inside, tissue, emb = lookup_cells(result.tiles, cells)
    assert inside.tolist() == [True, True, False] and tissue.tolist() == [True, False, False]
    np.testing.assert_array_equal(emb[0], result.tiles.embeddings[1, 2])
    assert not emb[1:].any()
    assert cells_region(np.array([[10, 10], [11, 12]]), 64.0).as_tuple() == (640, 640, 768, 832)


def test_review_counts_unsure_cells_as_tissue_and_lists_them():
    result, _truth, clf = taught()
    sure = classify_result(result, clf, min_confidence=0.0).summary()
    strict = classify_result(result, clf, min_confidence=0.999).summary()
    assert strict.tissue_mm2 == pytest.approx(sure.tissue_mm2)
    assert strict.analysed_cells == sure.analysed_cells
    assert [r.name for r in sure.tiles_by_class] == list(NAMES) and sure.tiles_unsure is None
    assert [r.name for r in strict.tiles_by_class] == list(NAMES)
    assert strict.tiles_unsure is not None and strict.tiles_unsure.name == "unsure"
    n_strict = sum(r.count for r in strict.tiles_by_class) + strict.tiles_unsure.count
    assert n_strict == sum(r.count for r in sure.tiles_by_class) == sure.analysed_cells
    # summary.json says the same: unsure cells are analysed tissue, listed on their own
    tiles = summary_dict(classify_result(result, clf, min_confidence=0.999))["tiles"]
    assert tiles["unsure_cells"] == strict.tiles_unsure.count > 0
    assert tiles["analysed_cells"] == strict.analysed_cells
    assert (
        sum(c["cells"] for c in tiles["per_class"].values()) + tiles["unsure_cells"]
        == (tiles["analysed_cells"])
    )


def test_a_foundation_vit_from_local_weights_is_taught_the_same_way(tmp_path: Path, wsi_dir):
    """Foundation backbones (UNI, Virchow, ...) come through timm from local weights; their
    cell embeddings feed the same probe. A tiny timm ViT stands in for them (no weights can
    be downloaded here), on the real sample slide."""
    import warnings

    import timm
    from safetensors.torch import save_file

    from histolens.inference import analyze_region
    from histolens.models import create_model
    from histolens.models._registry import _REGISTRY
    from histolens.models._zoo import register_foundation_model
    from histolens.slide import open_slide

    saved = dict(_REGISTRY)
    try:
        register_foundation_model(
            "tiny-fm", "vit_tiny_patch16_224", hf_hub_id=None, mean=(0.5,) * 3, std=(0.5,) * 3
        )
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
        weights = tmp_path / "tiny-fm.safetensors"
        save_file({f"model.{k}": v.contiguous() for k, v in vit.state_dict().items()}, weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the untrained heads warn; only embeddings count
            model = create_model("tiny-fm", weights=weights, device="cpu")
        slide = open_slide(wsi_dir / "CMU-1-Small-Region.svs")
        result = analyze_region(
            slide, Region(1000, 600, 1512, 1112), model=model, tasks=("tiles",), cache=False
        )
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)
    tiles = result.tiles
    assert tiles.embeddings.shape[-1] == 192  # the ViT's width, not the default model's
    tissue = np.asarray(tiles.classes) > 0
    marks = np.zeros(tiles.classes.shape, np.int32)
    marks[: marks.shape[0] // 2][tissue[: marks.shape[0] // 2]] = 1  # top half: class 1
    marks[marks.shape[0] // 2 :][tissue[marks.shape[0] // 2 :]] = 2  # bottom half: class 2
    examples, _ = examples_from_marks(tiles, marks)
    clf = train_tile_classifier(
        examples, ("top", "bottom"), ("#ff0000", "#0000ff"), {"name": "tiny-fm"}
    )
    painted = classify_result(result, clf, min_confidence=0.0).tiles.classes
    assert clf.backbone == "tiny-fm" and clf.embed_dim == 192
    assert (painted[marks > 0] == marks[marks > 0]).mean() >= 0.9
    with pytest.raises(ValueError, match="tiny-fm"):
        clf.check_backbone({"name": "histolens-default", "weights_sha256": "ab" * 32})
