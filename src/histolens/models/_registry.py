"""One registry, one factory: ``register_model``, ``list_models``, ``create_model``.

Torch-free: entries are cards plus builder functions that import torch only when called, so
``list_models()`` and the GUI's model list never pay for a torch import.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .card import ModelCard, WeightsError

if TYPE_CHECKING:
    from ._model import HistoLensModel

__all__ = [
    "DEFAULT_MODEL",
    "WEIGHTS_DIR",
    "create_model",
    "get_card",
    "list_models",
    "register_model",
]

#: Embedded weights live here as ``<name>.safetensors`` + ``<name>.card.json``.
WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = "histolens-default"

Builder = Callable[..., "HistoLensModel"]


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its card, how to build it, and where its weights are.

    ``weights``: a full-model safetensors file (``<name>.card.json`` beside it overrides the
    card). ``requires_weights``: ``create_model`` refuses to return random weights unless
    ``pretrained=False``. ``foundation``: ``weights`` (or the HF cache) hold a *backbone-only*
    timm checkpoint, passed to the builder as ``checkpoint``.
    """

    card: ModelCard
    builder: Builder
    weights: Path | None = None
    requires_weights: bool = False
    foundation: bool = False
    options: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    card: ModelCard,
    *,
    weights: str | Path | None = None,
    requires_weights: bool = False,
    foundation: bool = False,
    **options: Any,
) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(card, **options) -> HistoLensModel`` under ``card.name``."""

    def deco(builder: Builder) -> Builder:
        _REGISTRY[card.name] = ModelEntry(
            card,
            builder,
            Path(weights) if weights else None,
            requires_weights,
            foundation,
            dict(options),
        )
        return builder

    return deco


def list_models(pattern: str = "*", *, trained: bool = False) -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted; the default first.

    ``trained=True`` keeps only models whose complete trained weights are on this machine
    (backbone *and* heads), i.e. the ones whose outputs mean something; the others are
    architectures for training, benchmarks and tests.
    """
    names = sorted(
        n
        for n in _REGISTRY
        if fnmatch.fnmatch(n, pattern) and (not trained or _has_trained_weights(_REGISTRY[n]))
    )
    if DEFAULT_MODEL in names:
        names.remove(DEFAULT_MODEL)
        names.insert(0, DEFAULT_MODEL)
    return names


def _has_trained_weights(entry: ModelEntry) -> bool:
    # Foundation entries hold a backbone checkpoint only: their task heads are untrained.
    return entry.weights is not None and not entry.foundation and Path(entry.weights).is_file()


def _entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        close = [n for n in _REGISTRY if name.lower() in n or n in name.lower()]
        hint = f" (did you mean {close}?)" if close else ""
        msg = f"unknown model {name!r}{hint}; registered models: {list_models()}"
        raise ValueError(msg)
    return _REGISTRY[name]


def get_card(name: str | None = None) -> ModelCard:
    """The card ``create_model(name)`` would use (the weights' card when they are present)."""
    entry = _entry(name or DEFAULT_MODEL)
    if entry.weights is not None and not entry.foundation:
        from ._paths import card_path_for

        cp = card_path_for(entry.weights)
        if cp.is_file():
            return ModelCard.from_json(cp)
    return entry.card


def create_model(
    name: str | None = None,
    *,
    weights: str | Path | None = None,
    device: Any = None,
    pretrained: bool = True,
    card: ModelCard | None = None,
) -> HistoLensModel:
    """Build a registered model, load its weights, move it to ``device`` and set eval mode.

    ``name`` None means ``histolens-default``. ``weights``: a ``.safetensors`` file to load
    instead of the entry's own (its ``.card.json`` beside it, when present, becomes the card).
    ``pretrained=False``: random initialisation (for training). ``card``: build the architecture
    for this card instead (e.g. other class lists for training). ``device``: default CUDA, MPS,
    then CPU.
    """
    name = name or DEFAULT_MODEL
    entry = _entry(name)
    from ._model import default_device, load_model_weights
    from ._paths import card_path_for

    path = Path(weights) if weights is not None else (entry.weights if pretrained else None)
    use_card = card or entry.card
    expected = ""  # the sha256 the weights file must have
    if path is not None and not entry.foundation:
        if not path.is_file():
            if weights is None and entry.requires_weights:
                msg = (
                    f"the weights of {name!r} are not built yet: {path} is missing. "
                    "Build them with "
                    f"`histolens train` (the project's recipe writes {path.name} and "
                    f"{card_path_for(path).name} there), or call create_model({name!r}, "
                    "pretrained=False) for the untrained architecture"
                )
                raise WeightsError(msg)
            if weights is not None:
                msg = f"weights file {path} does not exist; pass the path of a .safetensors file"
                raise WeightsError(msg)
            path = None
        else:
            use_card, expected = _verified_card(
                name, entry, path, card, explicit=weights is not None
            )
    if pretrained and path is None and entry.weights is not None and not entry.foundation:
        warnings.warn(
            f"model {name!r} has no trained weights here; it is randomly initialised", stacklevel=2
        )
    if entry.foundation:
        model = entry.builder(
            use_card,
            checkpoint=path if pretrained else None,
            pretrained=pretrained,
            **entry.options,
        )
    else:
        model = entry.builder(use_card, **entry.options)
        if path is not None:
            load_model_weights(model, path, expected_sha256=expected)
    return model.to(default_device(device)).eval()


def _verified_card(
    name: str, entry: ModelEntry, path: Path, card: ModelCard | None, *, explicit: bool
) -> tuple[ModelCard, str]:
    """The card to build with and the sha256 ``path`` must have.

    The hash comes from the card beside the file, else (for the entry's own weights) from the
    registered card. A file with no hash is loaded only when the user named it (``explicit``),
    with a warning, and its card then carries no hash: nothing vouches for it.
    """
    from ._paths import card_path_for

    beside = card_path_for(path)
    file_card = ModelCard.from_json(beside) if beside.is_file() else None
    use_card = card or file_card or entry.card
    expected = file_card.weights_sha256 if file_card is not None else ""
    if not expected and not explicit:
        expected = entry.card.weights_sha256
    if expected:
        return use_card, expected
    if not explicit:
        msg = (
            f"the weights of {name!r} at {path} cannot be verified: no sha256 in a card beside "
            f"them ({beside.name}) nor in the registry; restore the card, or pass the file "
            f"explicitly (create_model({name!r}, weights=...) or --weights) to load it unverified"
        )
        raise WeightsError(msg)
    warnings.warn(
        f"weights file {path} is UNVERIFIED: no card with its sha256 beside it ({beside.name}); "
        "loading it because it was passed explicitly -- use only files you trust",
        UserWarning,
        stacklevel=3,
    )
    return use_card.replace(weights_sha256=""), ""
