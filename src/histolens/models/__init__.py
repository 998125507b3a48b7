"""Models: one registry and factory, the model card, backbones, heads and post-processing.

``import histolens.models`` is torch-free: the card, the registry and ``list_models()`` never
import torch; ``create_model`` and the weight functions import it on first use.
"""

from __future__ import annotations

from typing import Any

from . import _zoo  # noqa: F401  (registers the built-in models)
from ._registry import (
    DEFAULT_MODEL,
    WEIGHTS_DIR,
    create_model,
    get_card,
    list_models,
    register_model,
)
from .card import ALL_TASKS, ModelCard, WeightsError

__all__ = [
    "ALL_TASKS",
    "DEFAULT_MODEL",
    "WEIGHTS_DIR",
    "HistoLensModel",
    "ModelCard",
    "WeightsError",
    "create_model",
    "get_card",
    "list_models",
    "load_model_weights",
    "register_model",
    "save_model_weights",
]

_LAZY = {"HistoLensModel", "load_model_weights", "save_model_weights"}


def __getattr__(name: str) -> Any:
    # torch-backed names load on first use so listing models stays light.
    if name in _LAZY:
        from . import _model

        return getattr(_model, name)
    msg = f"module 'histolens.models' has no attribute {name!r}"
    raise AttributeError(msg)
