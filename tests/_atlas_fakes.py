"""Atlas models with hand-set weights whose attention is known in advance (test helpers).

The stem is replaced by :class:`BrightnessStem`; every MSA block's projections, MLP output and
position MLP are zeroed and its norms made identities, so a token passes through unchanged and
its attention follows only the query/key weights the caller sets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from histolens.models import ModelCard
from histolens.models import atlas as A
from histolens.models._model import HistoLensModel


class BrightnessStem(nn.Module):
    """Stride-16 tokens: channel 0 = mean brightness of the 16x16 patch (-1 black, +1 white,
    after the card's 0.5/0.5 normalisation), channel 1 = 1; the skip features are zeros."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.channels = {2: 1, 4: 1, 8: 1, 16: dim}

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        b, _, h, w = x.shape
        t = torch.zeros(b, self.dim, h // 16, w // 16, dtype=x.dtype)
        t[:, 0] = F.avg_pool2d(x.mean(1, keepdim=True), 16)[:, 0]
        t[:, 1] = 1.0
        return {**{s: torch.zeros(b, 1, h // s, w // s) for s in (2, 4, 8)}, 16: t}


def brightness_atlas(
    set_weights: Callable[[int, nn.Module, int], None], *, name: str, halo: int, description: str
) -> HistoLensModel:
    """A 3-scale Atlas on :class:`BrightnessStem` tokens, attention task only.

    ``set_weights(scale, block, head_dim)`` sets the query/key weights of each scale's MSA
    block (under ``torch.no_grad``) after everything else was zeroed.
    """
    cfg = A.AtlasConfig(
        stem_in=8, stem_features=8, heads=2, depths=(1,), g=2, pos_hidden=8, scale_blocks=3
    )
    net = A.Atlas(cfg)
    net.stem = BrightnessStem(cfg.dim)
    hd = cfg.dim // cfg.heads
    with torch.no_grad():
        for s, blk in enumerate(net.stages[0][0].scales):
            blk.norm_q, blk.norm_kv, blk.norm2 = nn.Identity(), nn.Identity(), nn.Identity()
            for p in (*blk.q.parameters(), *blk.kv.parameters(), *blk.proj.parameters()):
                p.zero_()
            for p in (*blk.mlp.fc2.parameters(), blk.pos[2].weight):
                p.zero_()
            set_weights(s, blk, hd)
    card = ModelCard(
        name=name,
        backbone="atlas",
        mpp=0.5,
        tile_size=1024,
        halo=halo,
        input_multiple=64,
        tasks=("attention",),
        class_cell_px=64,
        attention_strides=(16, 32),
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        description=description,
    )
    return HistoLensModel(card, net, None, None).eval()
