"""Teach tile classes: a linear probe on the cell embeddings an analysis already holds.

A :class:`~histolens.result.TileClassResult` keeps one backbone embedding per tile-class cell
(``embeddings``, (gh, gw, D)). The user marks cells with their own classes; a multinomial
logistic regression (:func:`histolens.models.probe.fit_logistic`) fitted on those cells'
embeddings re-classifies every analysed cell without running the backbone again.

Cells are addressed on the slide's global cell grid: cell ``(row, col)`` covers level-0
pixels ``[row * cell, (row + 1) * cell) x [col * cell, (col + 1) * cell)`` (``cell`` in
level-0 px, as :attr:`TileClassResult.cell`), so examples survive a pan or a new analysis.

A saved classifier is two files: ``NAME.safetensors`` (``weight`` (C, D), ``bias`` (C,),
float32) and ``NAME.card.json`` beside it (class names and colours, the backbone's name and
weights sha256, examples per class, grouped CV accuracy, date, and the sha256 of the weights
file, so a mismatched or corrupt pair is refused).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .region import Region
from .result import RegionResult, TileClassResult

__all__ = [
    "CV_MIN_EXAMPLES",
    "TileClassifier",
    "TrainingSet",
    "cells_region",
    "classify_result",
    "as_batch_writer",
    "classifier_paths",
    "examples_from_marks",
    "global_cells",
    "grouped_cv_accuracy",
    "load_tile_classifier",
    "lookup_cells",
    "spatial_groups",
    "train_tile_classifier",
]

#: Grouped cross-validation starts once every class has this many example cells.
CV_MIN_EXAMPLES = 5
#: Side, in cells, of the square neighbourhoods that CV folds keep together (4 x 32 um).
GROUP_CELLS = 4
FORMAT = "histolens-tile-classifier"
FORMAT_VERSION = 1
#: L2 penalty of the probe: strong, since a user teaches from tens of cells, not thousands.
L2 = 1e-1


@dataclass(frozen=True)
class TrainingSet:
    """Example cells: global ``cells`` (N, 2) ``(row, col)``, ``labels`` (N,) class indices,
    ``embeddings`` (N, D) float32."""

    cells: np.ndarray
    labels: np.ndarray
    embeddings: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TileClassifier:
    """A user's tile classes: ``logits = embedding @ weight.T + bias`` on raw cell embeddings.

    ``weight`` (C, D) and ``bias`` (C,) are float32; ``backbone`` and ``backbone_sha256``
    name the model card whose embeddings it was fitted on; ``cv_accuracy`` is the grouped
    cross-validated accuracy (None until every class has :data:`CV_MIN_EXAMPLES` examples);
    ``min_confidence`` is the top-class probability below which a cell stays unpainted.
    """

    class_names: tuple[str, ...]
    class_colors: tuple[str, ...]
    weight: np.ndarray
    bias: np.ndarray
    backbone: str
    backbone_sha256: str
    examples_per_class: tuple[int, ...]
    cv_accuracy: float | None = None
    created: str = ""
    min_confidence: float = 0.0

    @property
    def embed_dim(self) -> int:
        return int(self.weight.shape[1])

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Softmax class probabilities (N, C) of embeddings ``x`` (N, D)."""
        logits = np.asarray(x, np.float32) @ self.weight.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def check_backbone(self, card: Mapping[str, Any], *, source: str = "the model") -> None:
        """Raise ValueError, naming both, unless ``card`` (a model card dict) is this backbone."""
        name, sha = str(card.get("name", "?")), str(card.get("weights_sha256", ""))
        if name != self.backbone or sha != self.backbone_sha256:
            msg = (
                f"this tile classifier was taught on backbone {self.backbone!r} (weights "
                f"{self.backbone_sha256[:12] or '?'}) but {source} is {name!r} (weights "
                f"{sha[:12] or '?'}); teach it again on {name!r} or analyse with {self.backbone!r}"
            )
            raise ValueError(msg)

    def classify(
        self, tiles: TileClassResult, *, min_confidence: float | None = None
    ) -> TileClassResult:
        """``tiles`` re-classified into this classifier's classes (same grid and embeddings).

        Cells the analysis left empty (``classes == 0``: glass or not analysed) stay 0; so do
        cells whose top probability is below ``min_confidence`` ("unsure"; default: the
        classifier's own), though their probabilities are kept.
        """
        if min_confidence is None:
            min_confidence = self.min_confidence
        if tiles.embeddings is None:
            msg = "this analysis kept no cell embeddings; re-analyse with the 'tiles' task"
            raise ValueError(msg)
        d = tiles.embeddings.shape[-1]
        if d != self.embed_dim:
            msg = (
                f"the tile classifier expects {self.embed_dim}-wide embeddings but the analysis "
                f"has {d}-wide ones: it was made for another backbone"
            )
            raise ValueError(msg)
        analysed = np.asarray(tiles.classes) > 0
        probs = np.zeros((*analysed.shape, len(self.class_names)), np.float32)
        probs[analysed] = self.probabilities(tiles.embeddings[analysed])
        classes = np.zeros(analysed.shape, np.int32)
        sure = analysed & (probs.max(axis=-1) >= min_confidence)
        classes[sure] = probs[sure].argmax(axis=-1) + 1
        return replace(
            tiles,
            classes=classes,
            probabilities=probs,
            class_names=self.class_names,
            class_colors=self.class_colors,
        )

    def card(self, weights_sha256: str) -> dict[str, Any]:
        """The JSON card written beside the weights."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "class_names": list(self.class_names),
            "class_colors": list(self.class_colors),
            "backbone": {
                "name": self.backbone,
                "weights_sha256": self.backbone_sha256,
                "embed_dim": self.embed_dim,
            },
            "examples_per_class": dict(
                zip(self.class_names, map(int, self.examples_per_class), strict=True)
            ),
            "grouped_cv_accuracy": self.cv_accuracy,
            "min_confidence": self.min_confidence,
            "created": self.created,
            "weights_sha256": weights_sha256,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``NAME.safetensors`` and ``NAME.card.json`` (each atomically); return the first."""
        from safetensors.numpy import save as save_bytes

        weights_path, card_path = classifier_paths(path)
        blob = save_bytes(
            {
                "weight": np.ascontiguousarray(self.weight, np.float32),
                "bias": np.ascontiguousarray(self.bias, np.float32),
            },
            metadata={"format": FORMAT},
        )
        card = json.dumps(self.card(hashlib.sha256(blob).hexdigest()), indent=1)
        _write_atomic(weights_path, blob)
        _write_atomic(card_path, card.encode())
        return weights_path


def classifier_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(NAME.safetensors, NAME.card.json)`` from either file's path (or NAME alone)."""
    p = Path(path)
    name = p.name
    for suffix in (".card.json", ".safetensors"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return p.with_name(name + ".safetensors"), p.with_name(name + ".card.json")


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tile_classifier(path: str | os.PathLike[str]) -> TileClassifier:
    """Read a classifier saved by :meth:`TileClassifier.save` (give either file's path).

    Raises FileNotFoundError for a missing file and ValueError, naming the file, for one that
    is corrupt, not a tile classifier, or does not match its card.
    """
    weights_path, card_path = classifier_paths(path)
    for p in (weights_path, card_path):
        if not p.is_file():
            msg = f"tile classifier file {p} not found (a classifier is NAME.safetensors + NAME.card.json)"
            raise FileNotFoundError(msg)
    blob = weights_path.read_bytes()
    try:
        card = json.loads(card_path.read_text())
        if card.get("format") != FORMAT:
            msg = f"format is {card.get('format')!r}, not {FORMAT!r}"
            raise ValueError(msg)
        if card.get("weights_sha256") != hashlib.sha256(blob).hexdigest():
            msg = "its weights file does not match the card (changed or damaged)"
            raise ValueError(msg)
        from safetensors.numpy import load as load_bytes

        tensors = load_bytes(blob)
        names = tuple(str(n) for n in card["class_names"])
        weight, bias = tensors["weight"].astype(np.float32), tensors["bias"].astype(np.float32)
        backbone = card["backbone"]
        if weight.shape != (len(names), int(backbone["embed_dim"])) or bias.shape != (len(names),):
            msg = f"weights {weight.shape} do not fit {len(names)} classes"
            raise ValueError(msg)
        counts = card.get("examples_per_class", {})
        return TileClassifier(
            class_names=names,
            class_colors=tuple(str(c) for c in card["class_colors"]),
            weight=weight,
            bias=bias,
            backbone=str(backbone["name"]),
            backbone_sha256=str(backbone["weights_sha256"]),
            examples_per_class=tuple(int(counts.get(n, 0)) for n in names),
            cv_accuracy=card.get("grouped_cv_accuracy"),
            created=str(card.get("created", "")),
            min_confidence=float(card.get("min_confidence", 0.0)),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        msg = (
            f"{weights_path} is not a usable histolens tile classifier ({type(exc).__name__}: "
            f"{exc}); save it again from the dock's Teach section"
        )
        raise ValueError(msg) from exc


# -- examples ---------------------------------------------------------------------------------


def global_cells(tiles: TileClassResult) -> tuple[int, int]:
    """Global ``(row, col)`` of ``tiles``' cell (0, 0) on the slide's cell grid."""
    return (int(round(tiles.origin[0] / tiles.cell)), int(round(tiles.origin[1] / tiles.cell)))


def examples_from_marks(tiles: TileClassResult, marks: np.ndarray) -> tuple[TrainingSet, int]:
    """Example cells from ``marks`` (same shape as ``tiles.classes``; class index + 1, 0 none).

    Returns the examples on analysed tissue and the number of marked cells that are not
    (glass or not analysed: they have no embedding).
    """
    marks = np.asarray(marks)
    if marks.shape != tiles.classes.shape:
        msg = f"marks of shape {marks.shape} do not match the tile grid {tiles.classes.shape}"
        raise ValueError(msg)
    if tiles.embeddings is None:
        msg = "this analysis kept no cell embeddings; re-analyse with the 'tiles' task"
        raise ValueError(msg)
    marked = marks > 0
    usable = marked & (np.asarray(tiles.classes) > 0)
    rows, cols = np.nonzero(usable)
    r0, c0 = global_cells(tiles)
    examples = TrainingSet(
        cells=np.stack([rows + r0, cols + c0], axis=1).astype(np.int64),
        labels=marks[usable].astype(np.int64) - 1,
        embeddings=np.asarray(tiles.embeddings[usable], np.float32),
    )
    return examples, int(np.count_nonzero(marked & ~usable))


def lookup_cells(
    tiles: TileClassResult, cells: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where global ``cells`` (N, 2) ``(row, col)`` fall in ``tiles``.

    Returns ``inside`` (N,) bool (on this grid), ``tissue`` (N,) bool (inside and analysed,
    ``classes > 0``) and ``embeddings`` (N, D) float32, zero where not ``tissue``.
    """
    if tiles.embeddings is None:
        msg = "this analysis kept no cell embeddings; re-analyse with the 'tiles' task"
        raise ValueError(msg)
    cells = np.asarray(cells, np.int64).reshape(-1, 2)
    r0, c0 = global_cells(tiles)
    rows, cols = cells[:, 0] - r0, cells[:, 1] - c0
    gh, gw = tiles.classes.shape
    inside = (rows >= 0) & (rows < gh) & (cols >= 0) & (cols < gw)
    tissue = inside.copy()
    tissue[inside] = np.asarray(tiles.classes)[rows[inside], cols[inside]] > 0
    emb = np.zeros((len(cells), tiles.embeddings.shape[-1]), np.float32)
    emb[tissue] = tiles.embeddings[rows[tissue], cols[tissue]]
    return inside, tissue, emb


def cells_region(cells: np.ndarray, cell: float) -> Region:
    """The level-0 box (half-open, whole pixels) covering global ``cells`` of ``cell`` px."""
    cells = np.asarray(cells, np.int64).reshape(-1, 2)
    lo, hi = cells.min(0), cells.max(0) + 1
    return Region(
        int(np.floor(lo[0] * cell)),
        int(np.floor(lo[1] * cell)),
        int(np.ceil(hi[0] * cell)),
        int(np.ceil(hi[1] * cell)),
    )


def spatial_groups(cells: np.ndarray, size: int = GROUP_CELLS) -> np.ndarray:
    """Group id per cell: cells in the same ``size`` x ``size`` block of the global grid share one."""
    blocks = np.floor_divide(np.asarray(cells, np.int64).reshape(-1, 2), size)
    _, ids = np.unique(blocks, axis=0, return_inverse=True)
    return ids.reshape(-1)


def grouped_cv_accuracy(examples: TrainingSet, n_classes: int, *, l2: float = L2) -> float | None:
    """Accuracy pooled over grouped CV folds (:func:`spatial_groups`), or None while a class
    has fewer than :data:`CV_MIN_EXAMPLES` examples or all examples lie in one neighbourhood."""
    from .models.probe import cross_validate

    counts = np.bincount(examples.labels, minlength=n_classes)[:n_classes]
    groups = spatial_groups(examples.cells)
    n_groups = len(np.unique(groups))
    if len(examples) == 0 or counts.min() < CV_MIN_EXAMPLES or n_groups < 2:
        return None
    cv = cross_validate(
        examples.embeddings, examples.labels, groups, n_classes, k=min(5, n_groups), l2=l2
    )
    return float(cv["pooled_accuracy"])


def train_tile_classifier(
    examples: TrainingSet,
    class_names: Sequence[str],
    class_colors: Sequence[str],
    model_card: Mapping[str, Any],
    *,
    cv: bool = True,
    l2: float = L2,
) -> TileClassifier:
    """Fit the probe on ``examples``; with ``cv``, also its :func:`grouped_cv_accuracy`.

    Raises ValueError (for the user to read) with fewer than 2 classes or a class without
    example cells.
    """
    from .models.probe import fit_logistic

    n = len(class_names)
    if n < 2:
        msg = f"teach at least 2 classes (there {'is' if n == 1 else 'are'} {n})"
        raise ValueError(msg)
    counts = np.bincount(examples.labels, minlength=n)[:n] if len(examples) else np.zeros(n, int)
    empty = [name for name, c in zip(class_names, counts, strict=True) if c == 0]
    if empty:
        msg = f"mark some tissue cells for {', '.join(repr(e) for e in empty)} (no examples yet)"
        raise ValueError(msg)
    probe = fit_logistic(examples.embeddings, examples.labels, n, l2=l2)
    return TileClassifier(
        class_names=tuple(class_names),
        class_colors=tuple(class_colors),
        weight=probe.weight,
        bias=probe.bias,
        backbone=str(model_card.get("name", "")),
        backbone_sha256=str(model_card.get("weights_sha256", "")),
        examples_per_class=tuple(int(c) for c in counts),
        cv_accuracy=grouped_cv_accuracy(examples, n, l2=l2) if cv else None,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


# -- results ----------------------------------------------------------------------------------


def classify_result(
    result: RegionResult, classifier: TileClassifier, *, min_confidence: float | None = None
) -> RegionResult:
    """``result`` with its tile classes replaced by ``classifier``'s (backbone checked first)."""
    if result.tiles is None:
        msg = "the analysis has no tile classes; run it with the 'tiles' task to use a tile classifier"
        raise ValueError(msg)
    classifier.check_backbone(result.provenance.model_card, source="the analysis' model")
    tiles = classifier.classify(result.tiles, min_confidence=min_confidence)
    return replace(result, tiles=tiles)


def as_batch_writer(
    classifier: TileClassifier | str | os.PathLike[str],
    model_card: Any,
    tasks: Sequence[str],
    write: Callable[..., Any],
) -> Callable[..., Any]:
    """``write(result, ...)`` that first puts ``classifier``'s tile classes into ``result``.

    ``classifier`` (or its file) is loaded and checked against ``model_card`` and ``tasks``
    now, before any slide is analysed. The result is updated in place, so whoever receives
    it after writing (``run_batch``'s ``on_result``) sees the same classes.
    """
    if not isinstance(classifier, TileClassifier):
        classifier = load_tile_classifier(classifier)
    if "tiles" not in tasks:
        msg = "--tile-classifier needs the 'tiles' task; add it to --tasks"
        raise ValueError(msg)
    card = model_card.to_dict() if hasattr(model_card, "to_dict") else dict(model_card)
    classifier.check_backbone(card, source="the model")
    clf = classifier

    def write_classified(result: RegionResult, *args: Any, **kwargs: Any) -> Any:
        if result.tiles is not None:
            result.tiles = clf.classify(result.tiles)
        return write(result, *args, **kwargs)

    return write_classified
