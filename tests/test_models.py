"""Registry, cards, every model's forward, predict_tiles, safetensors I/O and its errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import histolens.models as hm
from histolens.models import ModelCard, WeightsError, create_model, list_models
from histolens.models._registry import _REGISTRY

torch.set_num_threads(2)


def test_import_is_torch_free_and_lists_models():
    code = (
        "import sys, histolens.models as m; names = m.list_models(); "
        "assert 'torch' not in sys.modules, 'torch imported'; print(','.join(names))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    names = out.strip().split(",")
    assert names[0] == "histolens-default"
    assert {"test-tiny", "atlas-small", "atlas-base", "pluto-s16", "pluto-s8", "uni"} <= set(names)


def test_list_models_pattern():
    assert list_models("atlas*") == ["atlas-base", "atlas-small"]


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="registered models: .*test-tiny"):
        create_model("no-such-model")


# ------------------------------------------------------------------------------------------
# Cards
# ------------------------------------------------------------------------------------------
def test_card_json_roundtrip(tmp_path):
    card = hm.get_card("test-tiny").replace(metrics={"pq": 0.5})
    path = tmp_path / "c.json"
    card.to_json(path)
    assert ModelCard.from_json(path) == card
    assert ModelCard.from_json(card.to_json()) == card
    assert json.loads(card.to_json())["nucleus_colors"][0] == [255, 0, 0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mpp": 0}, "mpp"),
        ({"tile_size": 250}, "multiple of input_multiple"),
        ({"nucleus_colors": ((1, 2, 3),)}, "nucleus_colors"),
        ({"tasks": ("nuclei", "segment")}, "tasks"),
        ({"weights_sha256": "xyz"}, "sha256"),
        ({"tissue_colors": ((0, 0, 300), (0, 0, 0), (0, 0, 0))}, "0..255"),
        ({"attention_strides": ()}, "attention_strides"),
    ],
)
def test_card_validation(change, message):
    with pytest.raises(ValueError, match=message):
        hm.get_card("test-tiny").replace(**change)


def test_card_rejects_unknown_keys():
    data = hm.get_card("test-tiny").to_dict()
    data["colour"] = 1
    with pytest.raises(ValueError, match="unknown model-card keys"):
        ModelCard.from_dict(data)


# ------------------------------------------------------------------------------------------
# Every registered model forwards at two sizes
# ------------------------------------------------------------------------------------------
def _build(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            entry = _REGISTRY[name]
            has_weights = entry.foundation or (
                entry.weights is not None and entry.weights.is_file()
            )
            return create_model(name, device="cpu", pretrained=has_weights)
        except WeightsError as exc:  # foundation entries without a local checkpoint
            pytest.skip(str(exc))


#: Big random inits (Atlas-B ~120M parameters, a second FlexiViT-S) cost ~10 s each on 2 cores;
#: they share all code paths with atlas-small / pluto-s16, so they run with `-m slow`.
_SLOW_BUILDS = {"atlas-base", "pluto-s8"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_BUILDS else n for n in list_models()],
)
def test_every_model_forwards_at_two_sizes(name):
    entry = _REGISTRY[name]
    if entry.foundation:
        from histolens.models.pluto import _cached_hub_file

        hub = entry.options.get("hf_hub_id")
        if hub is None or _cached_hub_file(hub) is None:
            pytest.skip(
                f"{name}: no local weights (HF cache of {hub}); the loading path is covered by "
                "test_foundation_from_local_checkpoint"
            )
    model = _build(name)
    card = model.card
    m = card.input_multiple
    for h, w in ((m, 2 * m), (2 * m, 2 * m)):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            out = model(x)
        c = card.class_cell_px
        assert out["nuclei_logits"].shape == (1, 1, h, w)
        assert out["hv"].shape == (1, 2, h, w)
        assert out["type_logits"].shape == (1, len(card.nucleus_types), h, w)
        assert out["tile_logits"].shape == (1, len(card.tissue_classes), h // c, w // c)
        assert out["embeddings"].shape[:2] == (1, model.tile_head.embed_dim)
        assert out["embeddings"].shape[2:] == (h // c, w // c)
        assert all(torch.isfinite(v).all() for v in out.values())
    # A complete card: everything a user or the GUI needs is filled in.
    assert card.description and card.licence and card.backbone
    assert len(card.nucleus_colors) == len(card.nucleus_types) > 0
    assert len(card.tissue_colors) == len(card.tissue_classes) > 0
    assert ("attention" in card.tasks) == bool(card.attention_strides)


def test_forward_rejects_bad_sizes():
    model = create_model("test-tiny", device="cpu")
    with pytest.raises(ValueError, match="multiples of card.input_multiple=32"):
        model(torch.zeros(1, 3, 48, 64))


# ------------------------------------------------------------------------------------------
# predict_tiles contract
# ------------------------------------------------------------------------------------------
def test_predict_tiles_contract():
    model = create_model("test-tiny", device="cpu")
    card = model.card
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (2, 256, 192, 3), dtype=np.uint8)
    out = model.predict_tiles(tiles, precision="fp32")
    c = card.class_cell_px
    assert out["nuclei_prob"].shape == (2, 256, 192)
    assert out["hv"].shape == (2, 2, 256, 192)
    assert out["type_prob"].shape == (2, len(card.nucleus_types), 256, 192)
    assert out["tile_probs"].shape == (2, 256 // c, 192 // c, len(card.tissue_classes))
    assert out["embeddings"].shape == (2, 256 // c, 192 // c, model.tile_head.embed_dim)
    assert set(out["attention"]) == {0}
    assert out["attention"][0].shape == (2, 256 // 16, 192 // 16)
    for v in [*(v for k, v in out.items() if k != "attention"), *out["attention"].values()]:
        assert v.dtype == np.float32
    assert 0 <= out["nuclei_prob"].min() and out["nuclei_prob"].max() <= 1
    assert -1 <= out["hv"].min() and out["hv"].max() <= 1
    np.testing.assert_allclose(out["type_prob"].sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(out["tile_probs"].sum(-1), 1, atol=1e-5)
    # Batch items are independent: running one alone gives the same answer.
    one = model.predict_tiles(tiles[1:], precision="fp32")
    np.testing.assert_allclose(one["nuclei_prob"][0], out["nuclei_prob"][1], atol=1e-5)
    # Only the requested tasks are computed.
    assert set(model.predict_tiles(tiles, tasks=("tiles",))) == {"tile_probs", "embeddings"}


def test_predict_tiles_bf16_close_to_fp32():
    model = create_model("test-tiny", device="cpu")
    tiles = np.random.default_rng(1).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    a = model.predict_tiles(tiles, precision="fp32")
    b = model.predict_tiles(tiles, precision="bf16")
    assert b["nuclei_prob"].dtype == np.float32
    assert np.abs(a["nuclei_prob"] - b["nuclei_prob"]).max() < 0.05
    assert np.abs(a["tile_probs"] - b["tile_probs"]).max() < 0.05


def _randomise_batchnorms(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics, so folding them into the convolutions is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2, generator=g)
                mod.running_var.uniform_(0.5, 2.0, generator=g)
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.normal_(0, 0.2, generator=g)


def test_the_engine_and_the_model_agree_on_precision_for_every_device(monkeypatch):
    """Regression: the engine resolved MPS to fp16, which predict_tiles then refused, so
    nothing could run on a Mac GPU. Both now ask one owner, ``models.precision``."""
    from histolens._engine import resolve_precision

    model = create_model("test-tiny")
    cls = type(model)
    for device, dtype in (("mps", torch.float16), ("cpu", torch.float32)):
        monkeypatch.setattr(cls, "device", property(lambda self, d=device: torch.device(d)))
        if device == "cpu":
            monkeypatch.setattr(hm.precision, "cpu_has_native_bf16", lambda: False)
        resolved = resolve_precision(device, "auto")
        assert model._run_dtype("auto") == model._run_dtype(resolved) == dtype
    monkeypatch.undo()
    tiles = np.random.default_rng(0).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    half = model.predict_tiles(tiles, precision="fp16")  # what the engine passes on MPS
    full = model.predict_tiles(tiles, precision="fp32")
    assert np.abs(half["nuclei_prob"] - full["nuclei_prob"]).max() < 1e-2


@pytest.mark.parametrize("name", ["test-tiny", "histolens-default"])
def test_fast_inference_equals_the_model_itself(name, monkeypatch):
    """Same weights, old path (the module itself, explicit attention weights) vs the inference
    copy (BN folded, channels-last, fused-kernel context reliance): fp32 max abs diff < 1e-4."""
    from histolens.models import _model
    from histolens.models.atlas import Atlas

    model = create_model(name, device="cpu", pretrained=False)
    _randomise_batchnorms(model)
    side = 256 if name == "test-tiny" else 512
    tiles = np.random.default_rng(3).integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    new = model.predict_tiles(tiles, precision="fp32")
    assert model.inference_copy(torch.float32) is not None
    monkeypatch.setattr(_model, "FAST_COPY_MAX_BYTES", 0)
    monkeypatch.setattr(Atlas, "supports_reliance", False)
    assert model.inference_copy(torch.float32) is None
    old = model.predict_tiles(tiles, precision="fp32")
    assert set(old) == set(new)
    for key in old:
        if key == "attention":
            assert set(old[key]) == set(new[key]) and old[key]
            for s in old[key]:
                assert np.abs(old[key][s] - new[key][s]).max() < 1e-4
        else:
            assert np.abs(old[key] - new[key]).max() < 1e-4, key


def test_inference_copy_follows_weight_changes():
    """The cached inference copy is rebuilt when the weights change in place (training)."""
    model = create_model("test-tiny", device="cpu")
    tiles = np.random.default_rng(4).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    a = model.predict_tiles(tiles, tasks=("nuclei",), precision="fp32")["nuclei_prob"]
    first = model.inference_copy(torch.float32)
    assert model.inference_copy(torch.float32) is first  # cached while nothing changes
    with torch.no_grad():
        model.nuclei_head.np_out.bias += 3.0
    b = model.predict_tiles(tiles, tasks=("nuclei",), precision="fp32")["nuclei_prob"]
    assert model.inference_copy(torch.float32) is not first
    assert b.mean() > a.mean() + 0.1


@pytest.mark.parametrize(
    ("tiles", "message"),
    [
        (np.zeros((1, 256, 256, 3), np.float32), "uint8"),
        (np.zeros((256, 256, 3), np.uint8), r"\(B, H, W, 3\)"),
        (np.zeros((1, 250, 256, 3), np.uint8), "input_multiple"),
    ],
)
def test_predict_tiles_input_errors(tiles, message):
    model = create_model("test-tiny", device="cpu")
    with pytest.raises(ValueError, match=message):
        model.predict_tiles(tiles)


def test_test_tiny_is_reproducible():
    a = create_model("test-tiny", device="cpu").state_dict()
    b = create_model("test-tiny", device="cpu").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_default_device_order():
    from histolens.models._model import default_device

    assert default_device("cpu") == torch.device("cpu")
    expected = (
        "cuda"
        if torch.cuda.is_available()
        else ("mps" if torch.backends.mps.is_available() else "cpu")
    )
    assert default_device().type == expected
    with pytest.raises(ValueError, match="choose 'cpu'"):
        default_device("tpu9")


# ------------------------------------------------------------------------------------------
# Weights: safetensors round trip and clear errors
# ------------------------------------------------------------------------------------------
def test_safetensors_roundtrip(tmp_path):
    model = create_model("test-tiny", device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # differ from the seeded init, so the load is visible
    path = tmp_path / "tiny.safetensors"
    card = hm.save_model_weights(model, path, metrics={"dice": 0.5})
    assert (tmp_path / "tiny.card.json").is_file()
    assert len(card.weights_sha256) == 64 and card.metrics == {"dice": 0.5}
    loaded = create_model("test-tiny", weights=path, device="cpu")
    assert loaded.card == card
    sa, sb = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert path.read_bytes()[:8] != b"\x80\x04\x95"[:8]  # not a pickle


def test_save_requires_safetensors_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        hm.save_model_weights(create_model("test-tiny", device="cpu"), tmp_path / "w.pt")


def test_sha_mismatch_is_reported(tmp_path):
    model = create_model("test-tiny", device="cpu")
    path = tmp_path / "tiny.safetensors"
    hm.save_model_weights(model, path)
    card_file = tmp_path / "tiny.card.json"
    data = json.loads(card_file.read_text())
    data["weights_sha256"] = "0" * 64
    card_file.write_text(json.dumps(data))
    with pytest.raises(WeightsError, match=r"tiny\.safetensors has sha256 .* expects 0000"):
        create_model("test-tiny", weights=path, device="cpu")


def test_corrupt_file_is_reported(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a safetensors file at all" * 10)
    with pytest.raises(WeightsError, match=r"bad\.safetensors is not a readable safetensors file"):
        create_model("test-tiny", weights=bad, device="cpu")
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"a": torch.zeros(2)}, pickled)
    with pytest.raises(WeightsError, match="never pickles"):
        create_model("test-tiny", weights=pickled, device="cpu")


def test_wrong_architecture_is_reported(tmp_path):
    path = tmp_path / "tiny.safetensors"
    hm.save_model_weights(create_model("test-tiny", device="cpu"), path)
    (tmp_path / "tiny.card.json").unlink()  # without its card, the default's card is used
    with pytest.raises(
        WeightsError, match=r"tiny\.safetensors does not match .*missing.*wrong shapes"
    ):
        create_model("histolens-default", weights=path, device="cpu")


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        create_model("test-tiny", weights=tmp_path / "nope.safetensors", device="cpu")


def test_default_without_weights_says_how_to_build(tmp_path, monkeypatch):
    entry = _REGISTRY["histolens-default"]
    monkeypatch.setitem(
        _REGISTRY,
        "histolens-default",
        dataclasses.replace(entry, weights=tmp_path / "histolens-default.safetensors"),
    )
    with pytest.raises(WeightsError, match=r"not built yet.*histolens train.*pretrained=False"):
        create_model()
    model = create_model("histolens-default", pretrained=False, device="cpu")
    assert model.card.name == "histolens-default" and model.card.backbone == "atlas_tiny"


def test_default_weights_load_when_present():
    entry = _REGISTRY["histolens-default"]
    if not entry.weights.is_file():
        pytest.skip(f"{entry.weights} is not built yet (histolens train writes it)")
    model = create_model(device="cpu")
    assert model.card.weights_sha256
    assert model.card == hm.get_card()


def test_custom_card_builds_matching_heads():
    card = hm.get_card("histolens-default").replace(
        tissue_classes=("a", "b"), tissue_colors=((0, 0, 0),) * 2
    )
    model = create_model("histolens-default", pretrained=False, card=card, device="cpu")
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    assert out["tile_logits"].shape == (1, 2, 1, 1)


# ------------------------------------------------------------------------------------------
# Foundation backbones from a local checkpoint; PLUTO FlexiViT; MIL head; CLI
# ------------------------------------------------------------------------------------------
def test_foundation_from_local_checkpoint(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    from histolens.models._zoo import register_foundation_model

    monkeypatch.setattr("histolens.models._registry._REGISTRY", dict(_REGISTRY))
    register_foundation_model(
        "tiny-fm", "vit_tiny_patch16_224", hf_hub_id=None, mean=(0.5,) * 3, std=(0.5,) * 3
    )
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path / "tiny-fm.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = create_model("tiny-fm", weights=path, device="cpu")
    own = model.backbone.vit.state_dict()
    assert all(torch.equal(own[k], v) for k, v in ref.state_dict().items())
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128))
    assert out["nuclei_logits"].shape == (1, 1, 128, 128)
    # No checkpoint and no hub id: a clear error, not a download.
    with pytest.raises(WeightsError, match="pass weights="):
        create_model("tiny-fm", device="cpu")
    # A mismatched checkpoint names the file.
    save_file({"pos_embed": torch.zeros(1, 3, 3)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(WeightsError, match=r"wrong\.safetensors does not fit"):
        create_model("tiny-fm", weights=tmp_path / "wrong.safetensors", device="cpu")


def test_foundation_absent_from_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        WeightsError, match="not in the local Hugging Face cache.*huggingface-cli download"
    ):
        create_model("uni", device="cpu")


def test_flexivit_patch_sizes_share_weights():
    from timm.models.vision_transformer import VisionTransformer

    from histolens.models.pluto import ViTBackbone, flexivit_small

    spec = flexivit_small()
    assert (spec.embed_dim, len(spec.blocks), spec.blocks[0].attn.num_heads) == (384, 12, 6)
    torch.manual_seed(0)
    # A narrow ViT keeps the test fast; the mechanism is the same as FlexiViT-S.
    vit = VisionTransformer(
        img_size=224,
        patch_size=16,
        embed_dim=48,
        depth=4,
        num_heads=2,
        num_classes=0,
        dynamic_img_size=True,
    )
    b16, b8 = ViTBackbone(vit, 16), ViTBackbone(vit, 8)
    assert b16.vit.patch_embed.proj.weight is b8.vit.patch_embed.proj.weight
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        o16, o8 = b16(x), b8(x)
    assert o16["scales"][0].shape == (1, 48, 4, 6) and o8["scales"][0].shape == (1, 48, 8, 12)
    assert sorted(o16["pyramid"]) == [2, 4, 8, 16] and sorted(o8["pyramid"]) == [2, 4, 8]
    assert len(o16["intermediates"]) == 4 and o16["cls"].shape == (1, 48)
    # FlexiViT PI-resize (w8 = w16 @ pinv(R), R = the bicubic 16->8 resize matrix): a 16x16 patch
    # x in R's row space, x = pinv(R) z, embeds at patch 16 exactly as its downsample z = R x does
    # at patch 8. A naive kernel resize does not have this property.
    F = torch.nn.functional
    eye = torch.eye(256, dtype=torch.float64).reshape(256, 1, 16, 16)
    resize = F.interpolate(eye, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    r = resize.reshape(256, 64).T  # (64, 256): 16x16 -> 8x8
    z = torch.randn(3, 64, dtype=torch.float64)
    x16 = (torch.linalg.pinv(r) @ z.T).T.reshape(1, 3, 16, 16).float()
    with torch.no_grad():
        e16 = b16._embed(x16).flatten()
        e8 = b8._embed((x16.double().reshape(3, 256) @ r.T).reshape(1, 3, 8, 8).float()).flatten()
    torch.testing.assert_close(e16, e8, rtol=1e-3, atol=1e-3)
    w = b16.vit.patch_embed.proj.weight
    naive = F.interpolate(w, size=(8, 8), mode="bilinear", antialias=True) * 4
    with torch.no_grad():
        e_naive = F.conv2d(
            z.reshape(1, 3, 8, 8).float(), naive, b16.vit.patch_embed.proj.bias, stride=8
        )
    assert not torch.allclose(e_naive.flatten(), e16, atol=1e-2)


def test_gated_attention_mil():
    from histolens.models.heads import GatedAttentionMIL

    torch.manual_seed(0)
    head = GatedAttentionMIL(16, 3).eval()
    h = torch.randn(2, 10, 16)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        logits, att = head(h, mask)
        perm = torch.randperm(10)
        logits_p, att_p = head(h[:, perm], mask[:, perm])
    assert logits.shape == (2, 3) and att.shape == (2, 10)
    torch.testing.assert_close(att.sum(1), torch.ones(2))
    assert torch.all(att[1, 6:] == 0)
    torch.testing.assert_close(logits, logits_p)  # a bag is a set: order does not matter
    torch.testing.assert_close(att_p, att[:, perm])


def test_cli_lists_and_prints_cards(capsys):
    import argparse

    from histolens.models import _cli

    parser = argparse.ArgumentParser()
    _cli.add_arguments(parser)
    assert _cli.run(parser.parse_args([])) == 0
    listing = capsys.readouterr().out
    assert "histolens-default" in listing and "test-tiny" in listing
    assert _cli.run(parser.parse_args(["test-tiny"])) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "test-tiny"
    assert _cli.run(parser.parse_args(["nope"])) == 2


def test_trained_listing_keeps_only_models_with_complete_weights_here():
    trained = list_models(trained=True)
    assert trained[0] == "histolens-default"  # the embedded weights ship with the package
    # random-init architectures and backbone-only foundation checkpoints are not "trained"
    assert not {"test-tiny", "atlas-small", "atlas-base", "pluto-s16", "uni"} & set(trained)
    assert set(trained) <= set(list_models())
