"""Each training command's options become one checked, frozen config: a bad value is one line
naming the option (exit 2) before any model or data is loaded; the CLI defaults are the
config's defaults."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from histolens.cli import console
from histolens.training.cli import evaluate, train
from histolens.training.config import (
    EvaluateConfig,
    ReleaseConfig,
    TrainNucleiConfig,
    TrainTilesConfig,
)


def _one_line_exit_2(capsys, argv: list[str]) -> str:
    code = console(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _parse(command, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, str]:
    for name in ("images", "labels", "run"):
        (tmp_path / name).mkdir()
    return {name: str(tmp_path / name) for name in ("images", "labels", "run")} | {
        "out": str(tmp_path / "out"),
        "weights": str(tmp_path / "new.safetensors"),
        "missing": str(tmp_path / "missing.safetensors"),
    }


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--lr", "-1"], "--lr -1.0: must be a positive finite number"),
        (["--minutes", "nan"], "--minutes nan: must be a positive finite number"),
        (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
        (["--max-steps", "0"], "--max-steps 0: must be an integer >= 1"),
        (["--warmup", "-3"], "--warmup -3: must be an integer >= 0"),
        (["--hed-sigma", "1.5"], "hed_sigma 1.5: stain jitter must be in [0, 1)"),
        (["--source-weights", "monusge=1"], "bad --source-weights 'monusge=1'"),
        (["--loss-weights", "hv_mse=-2"], "bad --loss-weights 'hv_mse=-2'"),
        (["--val-patients", ","], "--val-patients '': name at least one"),
    ],
)
def test_train_nuclei_bad_values_are_one_line(capsys, dirs, argv, words):
    line = _one_line_exit_2(capsys, ["train", "nuclei", "--out", dirs["out"], *argv])
    assert words in line
    assert not Path(dirs["out"]).exists()  # refused before the run folder was made


def test_train_nuclei_names_a_missing_init_file(capsys, dirs):
    argv = ["train", "nuclei", "--out", dirs["out"], "--init-partial", dirs["missing"]]
    line = _one_line_exit_2(capsys, argv)
    assert f"--init-partial {dirs['missing']}: no such file" in line


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--folds", "1"], "--folds 1: use 0 (no cross-validation) or 2 and more folds"),
        (["--mpp", "0"], "--mpp 0.0: um/px must be"),
        (["--l2", "-1"], "--l2 -1.0: must be a finite number >= 0"),
        (["--threads", "0"], "--threads 0: must be an integer >= 1"),
    ],
)
def test_train_tiles_bad_values_are_one_line(capsys, dirs, argv, words):
    base = ["train", "tiles", "--images", dirs["images"], "--out", dirs["weights"]]
    assert words in _one_line_exit_2(capsys, [*base, *argv])


def test_train_tiles_and_release_want_a_safetensors_file(capsys, dirs):
    line = _one_line_exit_2(capsys, ["train", "tiles", "--images", dirs["images"], "--out", "x.pt"])
    assert "--out x.pt: name a weights file ending in .safetensors" in line
    line = _one_line_exit_2(capsys, ["train", "release", "--run", dirs["run"], "--out", "x.pt"])
    assert "--out x.pt: name a weights file ending in .safetensors" in line


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--folds", "1"], "--folds 1: must be an integer >= 2"),
        (["--lc25000-tiles", "0"], "--lc25000-tiles 0: must be an integer >= 1"),
    ],
)
def test_train_release_bad_values_are_one_line(capsys, dirs, argv, words):
    base = ["train", "release", "--run", dirs["run"], "--out", dirs["weights"]]
    assert words in _one_line_exit_2(capsys, [*base, *argv])


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--only", ","], "--only '': name image stems"),
        (["--pred", "nowhere"], "--pred nowhere: is not a folder"),
        (["--weights", "gone.safetensors"], "--weights gone.safetensors: no such file"),
    ],
)
def test_evaluate_bad_values_are_one_line(capsys, dirs, argv, words):
    base = ["evaluate", "nuclei", "--images", dirs["images"], "--labels", dirs["labels"]]
    assert words in _one_line_exit_2(capsys, [*base, "--mpp", "0.25", *argv])


def test_the_command_line_defaults_are_the_configs_defaults(dirs):
    """Every field is read from the namespace, and an option left out gives the field's default."""
    cases = [
        (train, ["nuclei", "--out", dirs["out"]], TrainNucleiConfig(out=Path(dirs["out"]))),
        (
            train,
            ["tiles", "--images", dirs["images"], "--out", dirs["weights"]],
            TrainTilesConfig(images=Path(dirs["images"]), out=Path(dirs["weights"])),
        ),
        (
            train,
            ["release", "--run", dirs["run"], "--out", dirs["weights"]],
            ReleaseConfig(run=Path(dirs["run"]), out=Path(dirs["weights"])),
        ),
        (
            evaluate,
            ["nuclei", "--images", dirs["images"], "--labels", dirs["labels"], "--mpp", "0.5"],
            EvaluateConfig(images=Path(dirs["images"]), labels=Path(dirs["labels"]), mpp=0.5),
        ),
    ]
    for command, argv, expected in cases:
        args = _parse(command, *argv)
        assert type(expected).from_args(args) == expected
        names = {f.name for f in dataclasses.fields(expected)}
        assert names <= set(vars(args)), names - set(vars(args))


def test_a_train_nuclei_config_is_frozen_and_its_json_feeds_the_release_recipe(dirs):
    from histolens.training.release import _phase_command

    args = _parse(train, "nuclei", "--out", dirs["out"], "--lr", "3e-4", "--val-patients", "a, b")
    cfg = TrainNucleiConfig.from_args(args)
    assert cfg.val_patients == ("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]
    saved = cfg.as_json()
    assert saved["out"] == dirs["out"] and saved["val_patients"] == ["a", "b"]
    line = _phase_command({"args": saved, "step": 3, "elapsed_s": 60})
    assert "--lr 0.0003" in line and "--batch-size 8" in line
