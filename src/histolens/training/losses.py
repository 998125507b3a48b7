"""HoVer-style multi-task nuclei losses (``reference/models.md`` 3.1/3.2), in torch.

- NP (nuclei probability): BCE + soft Dice on every pixel.
- HV (horizontal/vertical maps): MSE on every pixel of samples that have instance labels, plus
  MSGE (mean squared error of the maps' Sobel gradients) restricted to their nuclei pixels.
- NT (nucleus type): CE + soft Dice on pixels whose type is known (target >= 0).

Targets follow :class:`histolens.training.targets.Example`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LossWeights", "nuclei_losses"]


@dataclass(frozen=True)
class LossWeights:
    """Per-term weights; the defaults are HoVer-Net's (all 1)."""

    np_bce: float = 1.0
    np_dice: float = 1.0
    hv_mse: float = 1.0
    hv_msge: float = 1.0
    nt_ce: float = 1.0
    nt_dice: float = 1.0


def sobel_kernels(size: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient kernels ``x / (x^2 + y^2)`` and ``y / (x^2 + y^2)`` (x = column offset)."""
    r = torch.arange(size, dtype=torch.float32) - size // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    d = x * x + y * y
    d[size // 2, size // 2] = 1.0  # centre weight is 0 anyway (x = y = 0)
    return x / d, y / d


def _grad(hv: torch.Tensor) -> torch.Tensor:
    """d(h)/dx and d(v)/dy of a (B, 2, H, W) map, same shape."""
    kx, ky = sobel_kernels(5)
    k = torch.stack([kx, ky])[:, None].to(hv)
    return F.conv2d(hv, k, padding=2, groups=2)


def _soft_dice(
    prob: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    if mask is not None:
        prob, target = prob * mask, target * mask
    inter = (prob * target).sum()
    return 1.0 - (2.0 * inter + 1.0) / (prob.sum() + target.sum() + 1.0)


def nuclei_losses(
    out: dict[str, torch.Tensor],
    foreground: torch.Tensor,
    hv: torch.Tensor,
    hv_valid: torch.Tensor,
    types: torch.Tensor,
    *,
    weights: LossWeights = LossWeights(),
    type_background: bool = False,
) -> dict[str, torch.Tensor]:
    """All loss terms and their weighted sum (``"total"``), computed in float32.

    ``foreground`` (B, H, W) float, ``hv`` (B, 2, H, W), ``hv_valid`` (B,) bool, ``types``
    (B, H, W) long with 0 background, k >= 1 type k - 1, -1 unknown. ``type_logits`` may have
    T channels (types only: trained on nucleus pixels) or, with ``type_background``, T + 1
    (channel 0 = background: trained on every pixel of known type).
    """
    logit = out["nuclei_logits"][:, 0].float()
    terms: dict[str, torch.Tensor] = {}
    terms["np_bce"] = F.binary_cross_entropy_with_logits(logit, foreground)
    terms["np_dice"] = _soft_dice(torch.sigmoid(logit), foreground)

    pred_hv = out["hv"].float()
    valid = hv_valid.to(pred_hv.dtype)[:, None, None, None]
    n_valid = valid.sum()
    if n_valid > 0:
        terms["hv_mse"] = (((pred_hv - hv) ** 2) * valid).sum() / (n_valid * pred_hv[0].numel())
        focus = (foreground[:, None] * valid).expand_as(pred_hv)
        terms["hv_msge"] = (((_grad(pred_hv) - _grad(hv)) ** 2) * focus).sum() / (
            focus.sum() + 1e-8
        )
    else:  # a batch of binary-mask tiles only: keep the graph, contribute nothing
        terms["hv_mse"] = terms["hv_msge"] = pred_hv.sum() * 0.0

    tl = out["type_logits"].float()
    n_types = tl.shape[1]
    if type_background:
        target = types
        known = types >= 0
    else:
        target = types - 1
        known = types >= 1
    if known.any():
        safe = target.clamp(min=0)
        ce = F.cross_entropy(tl, safe, reduction="none")
        terms["nt_ce"] = (ce * known).sum() / known.sum()
        prob = tl.softmax(1)
        onehot = F.one_hot(safe, n_types).permute(0, 3, 1, 2).to(prob)
        terms["nt_dice"] = _soft_dice(prob, onehot, known[:, None].to(prob))
    else:
        terms["nt_ce"] = terms["nt_dice"] = tl.sum() * 0.0

    total = sum(getattr(weights, k) * v for k, v in terms.items())
    terms["total"] = total
    return terms
