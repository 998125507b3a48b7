"""The model card: everything needed to run, align and credit a model, apart from the code.

A :class:`ModelCard` travels with the weights file (``<name>.card.json`` beside
``<name>.safetensors``). It is torch-free so the GUI and the CLI can list and describe models
without importing torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["ALL_TASKS", "ModelCard", "WeightsError"]

#: Tasks a model can serve; ``predict_tiles(tasks=...)`` picks a subset.
ALL_TASKS: tuple[str, ...] = ("nuclei", "tiles", "attention")

_HEX = set("0123456789abcdef")


class WeightsError(ValueError):
    """A weights file is missing, corrupt, not safetensors, or does not match its card/model."""


def _rgb_ok(color: Any) -> bool:
    return (
        isinstance(color, tuple)
        and len(color) == 3
        and all(isinstance(c, int) and 0 <= c <= 255 for c in color)
    )


@dataclass(frozen=True)
class ModelCard:
    """Facts about one model; validated on construction so bad values fail early.

    Units: ``mpp`` in um/px; ``tile_size``, ``halo``, ``input_multiple`` and ``class_cell_px``
    in pixels *at the model's mpp*; ``attention_strides`` in model-input pixels per attention
    map pixel, one per exported scale (scale ``s`` token covers a ``stride x stride`` square).
    ``nucleus_types`` excludes background: background vs nucleus is ``nuclei_prob``, and the
    type map is a softmax over these names only. Colours are ``(r, g, b)`` in 0..255.
    """

    name: str
    backbone: str
    mpp: float
    tile_size: int
    halo: int
    input_multiple: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    tasks: tuple[str, ...] = ALL_TASKS
    nucleus_types: tuple[str, ...] = ()
    nucleus_colors: tuple[tuple[int, int, int], ...] = ()
    tissue_classes: tuple[str, ...] = ()
    tissue_colors: tuple[tuple[int, int, int], ...] = ()
    class_cell_px: int = 64
    attention_strides: tuple[int, ...] = ()
    licence: str = "unknown"
    training_data: str = ""
    recipe: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    weights_sha256: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        # Normalise JSON lists to tuples so cards loaded from disk compare equal to built ones.
        for name in (
            "mean",
            "std",
            "tasks",
            "nucleus_types",
            "tissue_classes",
            "attention_strides",
        ):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("nucleus_colors", "tissue_colors"):
            object.__setattr__(
                self, name, tuple(tuple(int(v) for v in c) for c in getattr(self, name))
            )
        object.__setattr__(self, "metrics", dict(self.metrics))
        self._validate()

    def _fail(self, what: str) -> None:
        msg = f"ModelCard {self.name!r}: {what}"
        raise ValueError(msg)

    def _validate(self) -> None:
        if not self.name or not isinstance(self.name, str):
            self._fail("name must be a non-empty string")
        if not (isinstance(self.mpp, (int, float)) and math.isfinite(self.mpp) and self.mpp > 0):
            self._fail(f"mpp must be a positive number of um/px, got {self.mpp!r}")
        for key in ("tile_size", "input_multiple", "class_cell_px"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                self._fail(f"{key} must be a positive integer (px at the model mpp), got {value!r}")
        if not isinstance(self.halo, int) or self.halo < 0:
            self._fail(
                f"halo must be a non-negative integer (px at the model mpp), got {self.halo!r}"
            )
        if self.tile_size % self.input_multiple:
            self._fail(
                f"tile_size {self.tile_size} must be a multiple of input_multiple "
                f"{self.input_multiple}"
            )
        if self.input_multiple % self.class_cell_px and self.class_cell_px % self.input_multiple:
            self._fail(
                f"class_cell_px {self.class_cell_px} and input_multiple {self.input_multiple} "
                "must divide "
                "one another, so tile-class cells tile every valid input exactly"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            self._fail(
                f"mean and std need 3 values (RGB, 0..1 scale) and std > 0, "
                f"got {self.mean}, {self.std}"
            )
        unknown = set(self.tasks) - set(ALL_TASKS)
        if unknown or not self.tasks:
            self._fail(f"tasks {self.tasks} must be a non-empty subset of {ALL_TASKS}")
        if len(self.nucleus_colors) != len(self.nucleus_types):
            self._fail(
                f"{len(self.nucleus_types)} nucleus_types but {len(self.nucleus_colors)} "
                "nucleus_colors; "
                "give one (r, g, b) colour per type"
            )
        if len(self.tissue_colors) != len(self.tissue_classes):
            self._fail(
                f"{len(self.tissue_classes)} tissue_classes but {len(self.tissue_colors)} "
                "tissue_colors; "
                "give one (r, g, b) colour per class"
            )
        for c in self.nucleus_colors + self.tissue_colors:
            if not _rgb_ok(c):
                self._fail(f"colour {c!r} is not (r, g, b) with integers in 0..255")
        if "nuclei" in self.tasks and not self.nucleus_types:
            self._fail("task 'nuclei' needs at least one nucleus type (e.g. ('nucleus',))")
        if "tiles" in self.tasks and not self.tissue_classes:
            self._fail("task 'tiles' needs tissue_classes")
        if "attention" in self.tasks and not self.attention_strides:
            self._fail(
                "task 'attention' needs attention_strides (px per attention-map pixel, per scale)"
            )
        if any(not isinstance(s, int) or s <= 0 for s in self.attention_strides):
            self._fail(f"attention_strides must be positive integers, got {self.attention_strides}")
        sha = self.weights_sha256
        if sha and (len(sha) != 64 or set(sha) - _HEX):
            self._fail(f"weights_sha256 must be 64 lower-case hex digits or empty, got {sha!r}")
        for key, value in self.metrics.items():
            if not isinstance(key, str) or not isinstance(value, (int, float)):
                self._fail(f"metrics must map names to numbers, got {key!r}: {value!r}")

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    def to_json(self, path: str | Path | None = None) -> str:
        """The card as indented JSON; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """Build from a dict; unknown keys are an error (they usually mean a typo)."""
        known = {f.name for f in fields(cls)}
        extra = set(data) - known
        if extra:
            msg = f"unknown model-card keys {sorted(extra)}; known keys are {sorted(known)}"
            raise ValueError(msg)
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> ModelCard:
        """Parse a card from JSON text or from a ``.json`` file path."""
        text = str(text_or_path)
        source = "<text>"
        if isinstance(text_or_path, Path) or (
            not text.lstrip().startswith("{") and text.endswith(".json")
        ):
            source = str(text_or_path)
            try:
                text = Path(text_or_path).read_text(encoding="utf-8")
            except OSError as exc:
                msg = f"cannot read model card {source}: {exc}"
                raise ValueError(msg) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            msg = (
                f"model card {source} is not valid JSON ({exc}); "
                "re-create it with ModelCard.to_json"
            )
            raise ValueError(msg) from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> ModelCard:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)
