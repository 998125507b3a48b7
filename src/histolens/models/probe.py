"""Linear tile heads: a logistic regression on tile embeddings, grouped CV, and its install.

The shipped tile head is ``embeddings -> 1x1 conv classifier``; a multinomial logistic
regression fitted on tile embeddings (mean over the tile's cells) *is* such a classifier, so
it drops into the model exactly (:func:`install_linear_head`). The dock's taught classes
(:mod:`histolens.teach`) and ``histolens train tiles|release`` (:mod:`histolens.training`) both
fit it here.

Cross-validation is always grouped (near-duplicate families never straddle folds) and
stratified by class; :func:`grouped_folds` makes the folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "LinearProbe",
    "cross_validate",
    "fit_logistic",
    "grouped_folds",
    "install_linear_head",
]

#: Colours for user-defined tile classes (r, g, b), cycled when there are more classes.
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


@dataclass(frozen=True)
class LinearProbe:
    """Multinomial logistic regression ``logits = x @ weight.T + bias`` on raw embeddings.

    ``weight`` (C, D) and ``bias`` (C,) already include the feature standardisation.
    """

    weight: np.ndarray
    bias: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x).argmax(1)


def fit_logistic(
    x: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float = 1e-2, iters: int = 200
) -> LinearProbe:
    """Fit an L2-regularised multinomial logistic regression (torch L-BFGS, full batch).

    Features are standardised for conditioning; the scaling is folded back into the weights.
    """
    import torch

    mu = x.mean(0)
    sd = x.std(0) + 1e-6
    xt = torch.from_numpy(((x - mu) / sd).astype(np.float32))
    yt = torch.from_numpy(np.asarray(y, np.int64))
    w = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w.T + b, yt) + l2 * (w * w).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    wn = w.detach().numpy() / sd[None, :]
    bn = b.detach().numpy() - wn @ mu
    return LinearProbe(wn.astype(np.float32), bn.astype(np.float32))


def grouped_folds(labels: np.ndarray, groups: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """Fold index (0..k-1) per sample; whole groups per fold, balanced per class.

    Groups are dealt to folds class by class (a group's class = its majority label) in a
    seeded random order, each to the fold that holds fewest samples of that class so far.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    fold_of_group: dict[Any, int] = {}
    counts = np.zeros((k, int(labels.max()) + 1), int)
    uniq = np.unique(groups)
    rng.shuffle(uniq)
    # Big groups first so they do not unbalance the folds at the end.
    sizes = {g: int((groups == g).sum()) for g in uniq}
    for g in sorted(uniq, key=lambda g: -sizes[g]):
        cls = int(np.bincount(labels[groups == g]).argmax())
        f = int(np.argmin(counts[:, cls] + 1e-3 * counts.sum(1)))
        fold_of_group[g] = f
        counts[f, cls] += sizes[g]
    return np.array([fold_of_group[g] for g in groups])


def cross_validate(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    n_classes: int,
    *,
    k: int = 5,
    seed: int = 0,
    l2: float = 1e-2,
) -> dict[str, Any]:
    """k-fold CV of :func:`fit_logistic` with :func:`grouped_folds`: accuracy and balanced accuracy."""
    folds = grouped_folds(y, groups, k, seed=seed)
    accs, baccs = [], []
    pred = np.full(len(y), -1)
    for f in range(k):
        test = folds == f
        if not test.any() or test.all():
            continue
        probe = fit_logistic(x[~test], y[~test], n_classes, l2=l2)
        p = probe.predict(x[test])
        pred[test] = p
        accs.append(float((p == y[test]).mean()))
        baccs.append(_balanced_accuracy(y[test], p, n_classes))
    return {
        "folds": k,
        "n": len(y),
        "groups": len(np.unique(groups)),
        "accuracy_mean": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "balanced_accuracy_mean": float(np.mean(baccs)),
        "pooled_accuracy": float((pred == y).mean()),
        "fold_accuracy": accs,
    }


def _balanced_accuracy(y: np.ndarray, p: np.ndarray, n_classes: int) -> float:
    rec = [float((p[y == c] == c).mean()) for c in range(n_classes) if (y == c).any()]
    return float(np.mean(rec))


def install_linear_head(
    model: Any,
    probe: LinearProbe,
    classes: Sequence[str],
    colors: Sequence[tuple[int, int, int]] | None = None,
) -> Any:
    """Replace the model's tile classifier by ``probe`` and its card's classes; returns the model."""
    import torch

    head = model.tile_head
    if head is None:
        msg = f"model {model.card.name!r} has no tile head (card tasks {model.card.tasks}); use a model with task 'tiles'"
        raise ValueError(msg)
    d = probe.weight.shape[1]
    if d != head.embed_dim:
        msg = f"probe has {d} features but the tile head embeds {head.embed_dim}; fit it on this model's embeddings"
        raise ValueError(msg)
    conv = torch.nn.Conv2d(d, len(classes), 1)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(probe.weight)[:, :, None, None])
        conv.bias.copy_(torch.from_numpy(probe.bias))
    head.classifier = conv.to(next(model.parameters()).device)
    colors = (
        tuple(colors) if colors else tuple(PALETTE[i % len(PALETTE)] for i in range(len(classes)))
    )
    model.card = model.card.replace(tissue_classes=tuple(classes), tissue_colors=colors)
    return model
