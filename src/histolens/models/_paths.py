"""Torch-free helpers for weight files: the card path beside them and their sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["card_path_for", "file_sha256"]


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_path_for(weights_path: str | Path) -> Path:
    """``x/name.safetensors`` -> ``x/name.card.json`` (the card that travels with the weights)."""
    p = Path(weights_path)
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.stem
    return p.with_name(stem + ".card.json")
