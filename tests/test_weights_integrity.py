"""Weights are loaded only when a sha256 vouches for them, or when the user named the file."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import pytest

from histolens.models import WEIGHTS_DIR, WeightsError, create_model
from histolens.models._model import file_sha256, save_model_weights
from histolens.models._registry import _REGISTRY
from histolens.models._zoo import DEFAULT_WEIGHTS_SHA256

DEFAULT = "histolens-default"


@pytest.fixture
def embedded() -> Path:
    path = WEIGHTS_DIR / f"{DEFAULT}.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} is not built (histolens train writes it)")
    return path


def _tampered_copy(src: Path, folder: Path) -> Path:
    """The embedded weights with one byte of tensor data changed (still valid safetensors)."""
    data = bytearray(src.read_bytes())
    data[-100] ^= 0x01
    out = folder / src.name
    out.write_bytes(bytes(data))
    return out


def _use_weights(monkeypatch, name: str, path: Path) -> None:
    monkeypatch.setitem(_REGISTRY, name, dataclasses.replace(_REGISTRY[name], weights=path))


def test_the_registry_pins_the_embedded_weights_hash(embedded: Path):
    card = json.loads((WEIGHTS_DIR / f"{DEFAULT}.card.json").read_text())
    assert _REGISTRY[DEFAULT].card.weights_sha256 == DEFAULT_WEIGHTS_SHA256
    assert card["weights_sha256"] == DEFAULT_WEIGHTS_SHA256 == file_sha256(embedded)


def test_tampered_embedded_weights_are_refused_without_their_card(embedded, tmp_path, monkeypatch):
    tampered = _tampered_copy(embedded, tmp_path)  # no card beside it
    _use_weights(monkeypatch, DEFAULT, tampered)
    with pytest.raises(WeightsError, match=r"has sha256 .* expects 6a4b3029"):
        create_model(device="cpu")
    # a card beside it whose hash was emptied does not help either
    card = json.loads((WEIGHTS_DIR / f"{DEFAULT}.card.json").read_text())
    card["weights_sha256"] = ""
    (tmp_path / f"{DEFAULT}.card.json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match=r"has sha256 .* expects 6a4b3029"):
        create_model(device="cpu")
    # the untouched file, moved without its card, still loads: the registry vouches for it
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(embedded, moved / embedded.name)
    _use_weights(monkeypatch, DEFAULT, moved / embedded.name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert create_model(device="cpu").card.weights_sha256 == DEFAULT_WEIGHTS_SHA256


def test_a_tampered_file_named_explicitly_loads_with_a_warning(embedded, tmp_path):
    tampered = _tampered_copy(embedded, tmp_path)
    with pytest.warns(UserWarning, match=r"UNVERIFIED.*histolens-default\.card\.json"):
        model = create_model(DEFAULT, weights=tampered, device="cpu")
    assert model.card.weights_sha256 == ""  # nothing vouches for these weights


def test_registered_weights_without_any_hash_are_not_loaded_implicitly(tmp_path, monkeypatch):
    path = tmp_path / "tiny.safetensors"
    save_model_weights(create_model("test-tiny", device="cpu"), path)
    (tmp_path / "tiny.card.json").unlink()
    _use_weights(monkeypatch, "test-tiny", path)
    with pytest.raises(WeightsError, match=r"cannot be verified.*weights="):
        create_model("test-tiny", device="cpu")
    with pytest.warns(UserWarning, match="UNVERIFIED"):
        create_model("test-tiny", weights=path, device="cpu")


def test_a_file_with_its_card_loads_silently(tmp_path):
    path = tmp_path / "tiny.safetensors"
    card = save_model_weights(create_model("test-tiny", device="cpu"), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert create_model("test-tiny", weights=path, device="cpu").card == card
