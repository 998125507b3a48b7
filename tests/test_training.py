"""Training data, targets, augmentation, losses and the training loop (tiny stand-in model)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from histolens.models.probe import fit_logistic, grouped_folds
from histolens.training.config import TrainNucleiConfig
from histolens.training.datasets import (
    NUCLEUS_TYPES,
    NucleiSample,
    consep_group,
    decode_coco_rle,
    dihedral_dhash,
    group_near_duplicates,
    monuseg_patient,
    mosaic,
    resample_labels,
)
from histolens.training.targets import AugmentConfig, hv_targets, make_example


def _disks(shape=(96, 96), n=6, seed=0, types=True) -> NucleiSample:
    rng = np.random.default_rng(seed)
    inst = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for k in range(1, n + 1):
        cy, cx = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8)
        inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= int(rng.integers(9, 30))] = k
    img = np.full((*shape, 3), 230, np.uint8)
    img[inst > 0] = (90, 40, 140)
    t = np.where(inst > 0, (inst % 4) + 1, 0).astype(np.int16) if types else None
    return NucleiSample(f"s{seed}", f"g{seed}", "synthetic", img, inst, inst > 0, t)


# ----------------------------------------------------------------------------- data helpers


def test_group_names():
    assert monuseg_patient("TCGA-21-5784-01Z-00-DX1") == "TCGA-21-5784"
    assert consep_group("train_10_003.jpg") == "train_10"
    with pytest.raises(ValueError, match="_NNN"):
        consep_group("train_10")


def test_coco_rle_is_column_major():
    # 3 x 2 image, column-major runs: bg 1, fg 2, bg 3 -> pixels (1,0), (2,0) set
    m = decode_coco_rle({"size": [3, 2], "counts": [1, 2, 3]})
    assert m.tolist() == [[False, False], [True, False], [True, False]]
    with pytest.raises(ValueError, match="sum"):
        decode_coco_rle({"size": [3, 2], "counts": [1, 2]})


def test_resample_labels_is_nearest_and_keeps_ids():
    lab = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]], np.int32)
    half = resample_labels(lab, 0.5)
    assert half.tolist() == [[1, 2], [3, 4]]
    assert set(np.unique(resample_labels(lab, 1.7))) == {1, 2, 3, 4}


def test_mosaic_keeps_instances_apart():
    parts = [_disks((32, 32), n=3, seed=s) for s in range(4)]
    m = mosaic(parts)
    assert m.image.shape == (64, 64, 3)
    assert m.instances.max() == sum(len(np.unique(p.instances)) - 1 for p in parts)
    assert np.array_equal(m.foreground, m.instances > 0)


# ----------------------------------------------------------------------------- targets


def test_hv_targets_of_a_square_by_hand():
    inst = np.zeros((7, 7), np.int32)
    inst[1:6, 2:5] = 1  # 5 rows x 3 columns: centre (3, 3)
    hv = hv_targets(inst)
    assert hv[0, 3, 2:5].tolist() == [-1.0, 0.0, 1.0]  # x offsets scaled to [-1, 1]
    assert hv[1, 1:6, 3].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert np.all(hv[:, inst == 0] == 0)


def test_make_example_geometry_and_targets():
    s = _disks((160, 160), n=10)
    rng = np.random.default_rng(1)
    cfg = AugmentConfig(size=64)
    for _ in range(5):
        e = make_example(s, rng, cfg)
        assert e.image.shape == (64, 64, 3) and e.image.dtype == np.uint8
        assert e.hv.shape == (2, 64, 64) and e.hv_valid
        assert np.abs(e.hv).max() <= 1.0
        # Types stay aligned with the foreground after crop, zoom, flips and rotations.
        assert np.array_equal(e.types > 0, e.foreground > 0)
        assert np.all(e.hv[:, e.foreground == 0] == 0)


def test_binary_only_sample_has_no_hv_and_unknown_types():
    s = _disks((80, 80))
    s = NucleiSample("b", "b", "monuseg-binary", s.image, None, s.foreground, None)
    e = make_example(s, np.random.default_rng(0), AugmentConfig(size=64))
    assert not e.hv_valid and not e.hv.any()
    assert set(np.unique(e.types)) <= {-1, 0}


def test_dihedral_hash_is_flip_and_rotation_invariant():
    rng = np.random.default_rng(0)
    img = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    img[:20, :30] = 20  # some structure so the hash is not degenerate
    h = dihedral_dhash(img)
    for k in range(4):
        assert dihedral_dhash(np.rot90(img, k)) == h
        assert dihedral_dhash(np.rot90(img, k)[:, ::-1]) == h
    other = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    groups = group_near_duplicates(np.stack([img, np.rot90(img), other, img[::-1]]))
    assert groups[0] == groups[1] == groups[3] != groups[2]


def test_grouped_folds_never_split_a_group_and_balance_classes():
    groups = np.repeat(np.arange(40), 3)
    labels = groups % 4
    folds = grouped_folds(labels, groups, 5, seed=0)
    for g in range(40):
        assert len(set(folds[groups == g])) == 1
    for f in range(5):
        assert sorted(set(labels[folds == f])) == [0, 1, 2, 3]


def test_logistic_probe_separates_separable_classes():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (50, 5)), rng.normal(3, 1, (50, 5))]).astype(np.float32)
    y = np.repeat([0, 1], 50)
    probe = fit_logistic(x, y, 2)
    assert (probe.predict(x) == y).mean() > 0.95


# ----------------------------------------------------------------------------- losses + loop


class _Tiny:
    """Factory for a tiny conv net with the training contract of ``model(x)``."""

    @staticmethod
    def make():
        import torch
        from torch import nn

        class Tiny(nn.Module):
            def __init__(self):
                super().__init__()
                self.card = SimpleNamespace(
                    name="tiny",
                    mpp=0.5,
                    nucleus_types=NUCLEUS_TYPES,
                    mean=(0.5,) * 3,
                    std=(0.5,) * 3,
                )
                self.body = nn.Sequential(
                    nn.Conv2d(3, 16, 3, padding=1),
                    nn.ReLU(),
                    nn.Conv2d(16, 16, 3, padding=1),
                    nn.ReLU(),
                )
                self.out = nn.Conv2d(16, 1 + 2 + len(NUCLEUS_TYPES), 1)

            def forward(self, x):
                y = self.out(self.body(x))
                return {"nuclei_logits": y[:, :1], "hv": y[:, 1:3], "type_logits": y[:, 3:]}

        torch.manual_seed(0)
        return Tiny()


def test_losses_are_finite_and_mask_unknown_parts():
    import torch

    from histolens.training.losses import nuclei_losses

    model = _Tiny.make()
    ex = [
        make_example(_disks((64, 64), seed=i), np.random.default_rng(i), AugmentConfig(size=64))
        for i in range(2)
    ]
    from histolens.training.train import batch_tensors

    b = batch_tensors(ex, (0.5,) * 3, (0.5,) * 3)
    out = model(b["x"])
    terms = nuclei_losses(out, b["foreground"], b["hv"], b["hv_valid"], b["types"])
    assert all(torch.isfinite(v) for v in terms.values())
    # No HV labels and no known types: those terms vanish but keep the graph.
    terms = nuclei_losses(
        out,
        b["foreground"],
        b["hv"],
        torch.tensor([False, False]),
        torch.where(b["types"] > 0, -1, 0),
    )
    assert float(terms["hv_mse"]) == 0.0 and float(terms["nt_ce"]) == 0.0
    terms["total"].backward()


def _parse(*argv: str) -> argparse.Namespace:
    from histolens.training.cli import train

    p = argparse.ArgumentParser()
    train.add_arguments(p)
    return p.parse_args(argv)


def _args(tmp_path: Path, *extra: str) -> TrainNucleiConfig:
    return TrainNucleiConfig.from_args(
        _parse(
            "nuclei",
            "--out",
            str(tmp_path),
            "--crop",
            "64",
            "--batch-size",
            "2",
            "--warmup",
            "2",
            "--log-every",
            "2",
            "--precision",
            "fp32",
            *extra,
        )
    )


def _tiny_data():
    from histolens.training.train import NucleiData

    return NucleiData(
        train={"monuseg": [_disks((96, 96), n=8, seed=i) for i in range(3)]},
        val_monuseg=[_disks((64, 64), seed=9)],
    )


def test_training_loop_learns_checkpoints_and_resumes(tmp_path):
    from histolens.training.train import load_checkpoint, train_nuclei

    model = _Tiny.make()
    assert train_nuclei(_args(tmp_path, "--max-steps", "12"), model=model, data=_tiny_data()) == 0
    log = (tmp_path / "train.log").read_text()
    assert "done: 12 steps" in log
    losses = [
        float(line.split(" total ")[1].split()[0]) for line in log.splitlines() if "  lr " in line
    ]
    assert len(losses) == 6 and losses[-1] < losses[0], f"training loss did not decrease: {losses}"
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["step"] == 12 and meta["finished"] and meta["precision"] == "fp32"
    fresh = _Tiny.make()
    load_checkpoint(tmp_path / "checkpoint.safetensors", fresh, None)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), k
    assert (tmp_path / "final.safetensors").is_file()
    # --resume picks up at step 12 and runs to the new cap.
    assert (
        train_nuclei(
            _args(tmp_path, "--max-steps", "14", "--resume"), model=_Tiny.make(), data=_tiny_data()
        )
        == 0
    )
    log = (tmp_path / "train.log").read_text()
    assert "resumed from" in log and "at step 12" in log and "done: 14 steps" in log


def test_training_refuses_weights_that_exclude_every_source_with_data(tmp_path):
    from histolens.training.train import train_nuclei

    cfg = _args(tmp_path, "--max-steps", "1", "--source-weights", "monuseg=0")
    with pytest.raises(ValueError, match="every source with training data has weight 0"):
        train_nuclei(cfg, model=_Tiny.make(), data=_tiny_data())


def test_colour_grouping_joins_arbitrary_rotations_within_a_class():
    from skimage.transform import rotate

    rng = np.random.default_rng(3)

    def tissue(hue):
        base = np.zeros((64, 64, 3), np.float64)
        base[..., 0], base[..., 1], base[..., 2] = hue, 0.35, 0.75
        from scipy.ndimage import gaussian_filter

        blobs = (
            gaussian_filter(rng.random((64, 64)), 3) > 0.52
        )  # nuclei-sized blobs, not pixel noise
        base[blobs] = (0.35, 0.2, 0.55)
        return base

    a = tissue(0.9)
    a_rot = rotate(a, 23, mode="reflect", order=0)  # LC25000-style small-angle rotation
    b = tissue(0.55)
    c = tissue(0.9)  # same colours as `a`, other blobs, other class
    imgs = (np.stack([a, a_rot, b, c]) * 255).astype(np.uint8)
    g = group_near_duplicates(imgs, colour_l1=0.12, labels=np.array([0, 0, 0, 1]))
    assert g[0] == g[1] != g[2]
    assert g[3] != g[0]  # the colour test never joins across classes


def test_init_partial_copies_matching_tensors_and_names_the_rest(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from histolens.models import WeightsError, create_model
    from histolens.training.train import load_matching_weights

    model = create_model("test-tiny", pretrained=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in state if k.startswith("nuclei_head.") and k.endswith(".weight"))
    other = next(k for k in state if k.startswith("backbone.") and state[k].dtype.is_floating_point)
    donor = {
        other: torch.full_like(state[other], 0.25),
        key: torch.zeros(3, 3),
        "not.in.model": torch.ones(2),
    }
    path = tmp_path / "donor.safetensors"
    save_file(donor, str(path))
    copied, kept = load_matching_weights(model, path)
    assert copied == 1
    assert key in kept and other not in kept
    assert torch.all(model.state_dict()[other] == 0.25)
    assert torch.equal(model.state_dict()[key], state[key])  # reshaped: left as it was

    save_file({"unrelated": torch.ones(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(WeightsError, match="foreign.safetensors"):
        load_matching_weights(model, tmp_path / "foreign.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(WeightsError, match="garbage.safetensors"):
        load_matching_weights(model, tmp_path / "garbage.safetensors")


def test_decoder_refine_adds_capacity_and_keeps_output_shapes() -> None:
    import torch

    from histolens.models.heads import NucleiDecoder

    pyramid_channels = {16: 24, 8: 16, 4: 8}
    plain = NucleiDecoder(pyramid_channels, 12, 4)
    refined = NucleiDecoder(pyramid_channels, 12, 4, refine=True)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(refined) > n(plain)
    image = torch.randn(2, 3, 64, 64)
    pyramid = {s: torch.randn(2, c, 64 // s, 64 // s) for s, c in pyramid_channels.items()}
    context = torch.randn(2, 12, 2, 2)
    for m in (plain, refined):
        out = m.eval()(image, pyramid, context)
        assert out["nuclei_logits"].shape == (2, 1, 64, 64)
        assert out["hv"].shape == (2, 2, 64, 64) and out["type_logits"].shape == (2, 4, 64, 64)


def test_weight_options_parse_over_defaults_and_reject_typos():
    from histolens.training.config import SOURCE_WEIGHTS, parse_weights

    w = parse_weights("monuseg=0.5, consep=0", SOURCE_WEIGHTS, "--source-weights")
    assert w["monuseg"] == 0.5 and w["consep"] == 0.0 and w["pannuke"] == SOURCE_WEIGHTS["pannuke"]
    assert parse_weights(None, SOURCE_WEIGHTS, "--source-weights") == SOURCE_WEIGHTS
    for bad in ("monusge=1", "monuseg", "monuseg=-1", "monuseg=x", "monuseg=nan"):
        with pytest.raises(ValueError, match="--source-weights"):
            parse_weights(bad, SOURCE_WEIGHTS, "--source-weights")
    with pytest.raises(ValueError, match="at least one"):
        parse_weights(
            ",".join(f"{k}=0" for k in SOURCE_WEIGHTS), SOURCE_WEIGHTS, "--source-weights"
        )


def test_source_weights_steer_the_draw_and_zero_excludes_a_source():
    from histolens.training.train import NucleiData, _draw_sample

    a, b = _disks((96, 96), seed=1), _disks((96, 96), seed=2)
    data = NucleiData(train={"monuseg": [a], "pannuke": [b]})
    rng = np.random.default_rng(0)
    draws = [_draw_sample(data, rng, 64, {"monuseg": 0.9, "pannuke": 0.1}) for _ in range(400)]
    share = sum(d is a for d in draws) / len(draws)
    assert 0.85 < share < 0.95
    assert all(
        _draw_sample(data, rng, 64, {"monuseg": 0.0, "pannuke": 1.0}) is b for _ in range(20)
    )


def test_loss_weights_scale_their_terms_in_the_total():
    from histolens.training.losses import LossWeights, nuclei_losses
    from histolens.training.train import batch_tensors

    ex = [make_example(_disks((64, 64), seed=3), np.random.default_rng(3), AugmentConfig(size=64))]
    b = batch_tensors(ex, (0.5,) * 3, (0.5,) * 3)
    out = _Tiny.make()(b["x"])
    args = (out, b["foreground"], b["hv"], b["hv_valid"], b["types"])
    one = nuclei_losses(*args)
    two = nuclei_losses(*args, weights=LossWeights(hv_mse=2.0, hv_msge=2.0))
    extra = float(one["hv_mse"] + one["hv_msge"])
    assert extra > 0
    assert float(two["total"]) == pytest.approx(float(one["total"]) + extra, rel=1e-5)


def test_release_recipe_names_the_weight_options_of_a_phase():
    from histolens.training.release import _phase_command

    args = {"minutes": 80, "lr": 3e-4, "seed": 4, "threads": 1, "init_weights": "x"}
    plain = _phase_command({"args": args, "step": 10, "elapsed_s": 60})
    assert "--source-weights" not in plain and "--init-weights <previous phase>" in plain
    args |= {"source_weights": "monuseg=0.5", "loss_weights": "hv_msge=2"}
    line = _phase_command({"args": args, "step": 10, "elapsed_s": 60})
    assert "--source-weights monuseg=0.5 --loss-weights hv_msge=2" in line


def test_training_precision_takes_bf16_only_where_the_cpu_has_it(monkeypatch):
    """bf16 autocast is emulated (measured 137x slower per convolution) on CPUs without
    AMX / AVX-512 BF16, so ``--precision auto`` (the default) must fall back to fp32 there."""
    from histolens.models import precision
    from histolens.training.train import training_precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert training_precision("auto") == "fp32"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert training_precision("auto") == "bf16"
    assert training_precision("fp32") == "fp32" and training_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="auto, bf16, fp32"):
        training_precision("fp16")


def test_training_cli_defaults_to_auto_precision_and_exposes_stain_jitter(tmp_path):
    from histolens.training.targets import AugmentConfig

    args = _parse("nuclei", "--out", str(tmp_path), "--hed-sigma", "0.2")
    assert args.precision == "auto"
    assert args.hed_sigma == 0.2 and args.hed_bias == AugmentConfig.hed_bias
    bad = _parse("nuclei", "--out", str(tmp_path), "--hed-sigma", "-0.1")
    # The config refuses it when built, before any model or data is loaded.
    with pytest.raises(ValueError, match="hed_sigma -0.1: stain jitter must be in"):
        TrainNucleiConfig.from_args(bad)


def test_release_carries_the_history_of_shipped_weights_a_phase_started_from(tmp_path):
    """A phase warm-started from a released file adds to that file's recipe, steps and minutes;
    a file that no longer matches its card's sha256 contributes nothing."""
    from histolens.models._paths import card_path_for, file_sha256
    from histolens.training.release import _phase_command, _released_history

    weights = tmp_path / "histolens-default.safetensors"
    weights.write_bytes(b"weights of the earlier release")
    card = {
        "name": "histolens-default",
        "recipe": "histolens train nuclei --seed 0 (459 steps, 41 min). Phase 1 from random init; AdamW",
        "metrics": {"train_steps": 459, "train_minutes": 41.0},
        "weights_sha256": file_sha256(weights),
    }
    card_path_for(weights).write_text(json.dumps(card))
    phase = {
        "args": {"init_weights": str(weights), "precision": "fp32", "hed_sigma": 0.2},
        "step": 10,
        "elapsed_s": 60,
    }
    prior = _released_history(phase)
    assert prior is not None and prior["steps"] == 459 and prior["minutes"] == 41.0
    assert prior["recipe"] == "histolens train nuclei --seed 0 (459 steps, 41 min)"
    line = _phase_command(phase)
    assert "--hed-sigma 0.2" in line and "--precision fp32" in line and "--hed-bias" not in line
    auto = {"args": {"precision": "auto"}, "precision": "fp32", "step": 1, "elapsed_s": 1}
    assert "--precision fp32" in _phase_command(auto)  # what auto became, not "auto"
    weights.write_bytes(b"replaced since")
    assert _released_history(phase) is None
    assert _released_history({"args": {}, "step": 1, "elapsed_s": 1}) is None


def test_error_decomposition_credits_the_part_that_was_wrong():
    """Perfect maps score ~1 in every row; a model that misses half the nuclei loses AJI in
    "model" and "true_markers" (its foreground) but not in "true_foreground"."""
    from histolens.training.evaluate import error_decomposition

    # Separate nuclei of 4-5 px radius at 0.5 um/px (~15-20 um^2, above the 10 um^2 floor).
    inst = np.zeros((96, 96), np.int32)
    yy, xx = np.mgrid[:96, :96]
    for k, (cy, cx) in enumerate([(y, x) for y in (16, 48, 80) for x in (16, 48, 80)], 1):
        inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= 20] = k
    hv = hv_targets(inst)
    perfect = error_decomposition(inst, (inst > 0).astype(np.float32), hv, mpp=0.5)
    for row in perfect.values():
        assert row["aji"] > 0.95 and row["n_pred"] == 9
    half = np.where(inst % 2 == 1, inst > 0, 0).astype(np.float32)  # 5 of 9 nuclei found
    parts = error_decomposition(inst, half, hv, mpp=0.5)
    assert parts["model"]["n_pred"] == 5 and parts["model"]["aji"] < 0.7
    assert parts["true_markers"]["aji"] < 0.7
    assert parts["true_foreground"]["aji"] > 0.95 and parts["true_both"]["aji"] > 0.95
