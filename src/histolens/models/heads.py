"""Task heads that sit on any backbone: HoVer-style nuclei decoder, tile classes, attention MIL.

Heads are sized from the backbone's ``pyramid_channels`` (stride -> channels) and scale
channels, never by asking which backbone they got, so Atlas, PLUTO and foundation ViTs share them.
Strides are model-input pixels per feature pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GatedAttentionMIL", "NucleiDecoder", "TileClassHead"]


def resample_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool a finer map down to ``size`` or nearest-upsample a coarser one (B, C, h, w)."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if h >= size[0] and w >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="nearest")


def _conv_bn(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class NucleiDecoder(nn.Module):
    """HoVer/CellViT-style decoder: nucleus logit, horizontal/vertical distance, type logits.

    Starts at the coarsest pyramid stride (with a context map, e.g. a coarser scale or the class
    token, bilinearly resampled onto it), then doubles resolution step by step, concatenating the
    pyramid feature of each stride where the backbone has one, down to stride 1 where a light
    image branch restores pixel detail. The three outputs share the trunk (CPU budget) and split
    only at the last 1x1 convolutions.

    ``refine`` adds a second 3 x 3 convolution at every stride from 4 down, a 3 x 3 convolution
    at stride 1 and a separate 3 x 3 branch for the HV maps: HV regression needs more pixel-level
    capacity than the shared trunk gives a small model (its maps separate touching nuclei).
    """

    def __init__(
        self,
        pyramid_channels: dict[int, int],
        context_channels: int,
        n_types: int,
        widths: dict[int, int] | None = None,
        *,
        refine: bool = False,
    ) -> None:
        super().__init__()
        strides = sorted(pyramid_channels, reverse=True)
        top = strides[0]
        if top & (top - 1):
            msg = f"the coarsest pyramid stride must be a power of two, got {top}"
            raise ValueError(msg)
        default = {16: 96, 8: 64, 4: 48, 2: 32, 1: 16}
        self.widths = {s: (widths or {}).get(s, default.get(s, 64)) for s in _halvings(top)}
        self.top = top
        self.pyramid_strides = tuple(strides)
        self.enter = _conv_bn(pyramid_channels[top] + context_channels, self.widths[top], 1)
        self.ups = nn.ModuleDict()
        self.fuse = nn.ModuleDict()
        s = top
        while s > 2:
            t = s // 2
            self.ups[str(t)] = nn.ConvTranspose2d(self.widths[s], self.widths[t], 2, stride=2)
            fuse = _conv_bn(self.widths[t] + pyramid_channels.get(t, 0), self.widths[t])
            if refine and t <= 4:
                fuse = nn.Sequential(fuse, _conv_bn(self.widths[t], self.widths[t]))
            self.fuse[str(t)] = fuse
            s = t
        w1 = self.widths[1]
        self.up1 = nn.ConvTranspose2d(self.widths[2], w1, 2, stride=2)
        self.image = _conv_bn(3, w1 // 2)
        if refine:
            self.fuse1 = nn.Sequential(_conv_bn(w1 + w1 // 2, w1, 1), _conv_bn(w1, w1))
            self.hv_branch = _conv_bn(w1, w1)
        else:
            self.fuse1 = nn.Sequential(nn.Conv2d(w1 + w1 // 2, w1, 1), nn.ReLU())
            self.hv_branch = nn.Identity()
        self.np_out = nn.Conv2d(w1, 1, 1)
        self.hv_out = nn.Conv2d(w1, 2, 1)
        self.type_out = nn.Conv2d(w1, n_types, 1)

    @property
    def receptive_px(self) -> int:
        """Input px over which an output pixel reads its inputs (the sum of the 3 x 3 convs'
        reach at their strides): outputs farther than this from the edge of a crop do not
        see the crop's zero padding, so a cropped decode equals the full one there."""
        reach = 0
        for stride, part in (
            *((int(t), f) for t, f in self.fuse.items()),
            (self.top, self.enter),
            (1, self.image),
            (1, self.fuse1),
            (1, self.hv_branch),
        ):
            for m in part.modules():
                if isinstance(m, nn.Conv2d):
                    reach += stride * (m.kernel_size[0] // 2)
        return reach

    def forward(
        self,
        image: torch.Tensor,
        pyramid: dict[int, torch.Tensor],
        context: torch.Tensor,
        crop: tuple[int, int, int, int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``image`` (B, 3, H, W) normalised; ``pyramid[s]`` (B, C_s, H/s, W/s); ``context``
        any grid (resampled onto the coarsest pyramid stride).

        ``crop`` ``(y0, x0, y1, x1)`` in input px, multiples of the coarsest stride: decode
        only that box (outputs are the box's size). Outputs within :attr:`receptive_px` of a
        crop edge that is not an input edge differ from a full decode; the rest is the same.
        """
        x = pyramid[self.top]
        ctx = F.interpolate(
            context.to(x.dtype), size=x.shape[-2:], mode="bilinear", align_corners=False
        )
        if crop is not None:
            y0, x0, y1, x1 = crop
            if any(v % self.top for v in crop):
                msg = f"decoder crop {crop} must be in multiples of {self.top} input px"
                raise ValueError(msg)

            def cut(t: torch.Tensor, s: int) -> torch.Tensor:
                return t[..., y0 // s : y1 // s, x0 // s : x1 // s]

            x, ctx, image = cut(x, self.top), cut(ctx, self.top), cut(image, 1)
            pyramid = {s: cut(p, s) for s, p in pyramid.items()}
        x = self.enter(torch.cat([x, ctx], 1))
        s = self.top
        while s > 2:
            t = s // 2
            x = self.ups[str(t)](x)
            if t in pyramid and t in self.pyramid_strides:
                x = torch.cat([x, pyramid[t].to(x.dtype)], 1)
            x = self.fuse[str(t)](x)
            s = t
        x = self.up1(x)
        x = self.fuse1(torch.cat([x, self.image(image.to(x.dtype))], 1))
        return {
            "nuclei_logits": self.np_out(x),
            "hv": self.hv_out(self.hv_branch(x)),
            "type_logits": self.type_out(x),
        }


def _halvings(top: int) -> list[int]:
    out = [top]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


class TileClassHead(nn.Module):
    """Per-cell tissue class logits and embeddings on a ``cell_px`` grid.

    Each input feature map (any stride) is pooled or upsampled onto the cell grid, concatenated,
    and passed through a 2-layer MLP (1x1 convs) to a ``embed_dim`` embedding, then a linear
    classifier. Cells are independent, so the map is the same whether a region is run whole or
    tiled on the cell grid (up to the backbone's own context).
    """

    def __init__(
        self, in_channels: list[int], embed_dim: int, n_classes: int, cell_px: int
    ) -> None:
        super().__init__()
        self.cell_px = cell_px
        cin = sum(in_channels)
        self.norm = nn.GroupNorm(1, cin)
        self.mlp = nn.Sequential(
            nn.Conv2d(cin, embed_dim, 1), nn.GELU(), nn.Conv2d(embed_dim, embed_dim, 1)
        )
        self.classifier = nn.Conv2d(embed_dim, n_classes, 1)
        self.embed_dim = embed_dim

    def forward(
        self, features: list[torch.Tensor], image_hw: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        size = (image_hw[0] // self.cell_px, image_hw[1] // self.cell_px)
        x = torch.cat([resample_to(f, size) for f in features], 1)
        emb = self.mlp(self.norm(x))
        return {"tile_logits": self.classifier(emb), "embeddings": emb}


class GatedAttentionMIL(nn.Module):
    """Gated attention-MIL slide head (Ilse et al. 2018) over tile embeddings.

    ``forward(h, mask=None)`` with ``h`` (B, N, D) (or (N, D)) returns ``(logits (B, n_classes),
    attention (B, N))``; the attention sums to 1 over the unmasked tiles and is the per-tile
    heatmap to show on the slide.
    """

    def __init__(
        self, in_dim: int, n_classes: int, hidden: int = 128, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.v = nn.Linear(hidden, hidden)
        self.u = nn.Linear(hidden, hidden)
        self.w = nn.Linear(hidden, 1)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(
        self, h: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if h.dim() == 2:
            h = h[None]
        z = self.embed(h)
        scores = self.w(torch.tanh(self.v(z)) * torch.sigmoid(self.u(z))).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~mask.to(torch.bool), float("-inf"))
        a = torch.softmax(scores, dim=-1)
        pooled = torch.einsum("bn,bnd->bd", a, z)
        return self.classifier(pooled), a
