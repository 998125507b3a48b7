"""Atlas: a conv stem plus Multi-Scale Attention (MSA) over O(log N) scales of windows.

After Agrawal et al., "Atlas: Multi-Scale Attention Improves Long Context Image Modeling"
(arXiv 2503.12355), re-implemented from the description in ``docs/reference/models.md`` s.1 with
one deliberate fix: in the top-down pass each fine window reads the coarse window that
*spatially contains it* (:func:`parent_window_index`), not window ``i // r`` in raster order
(pitfall 1.8-1 of the reference code, wrong for inputs of 2048 px and up).

Frames: the stem has stride 16, so a scale-``s`` token covers a ``16 * g**s`` px square of the
(padded) model input, pixel ``(0, 0)`` at the input's top-left. Windows are ``m x m`` tokens in
raster order, batch-major: window index ``b * nW + row * grid_w + col``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, Mlp
from torch import nn

__all__ = [
    "ATLAS_CONFIGS",
    "Atlas",
    "AtlasConfig",
    "KeyWindow",
    "MSABlock",
    "QueryProbe",
    "context_reliance",
    "ScaleLayout",
    "num_scales",
    "parent_window_index",
    "scale_layouts",
]


@dataclass(frozen=True)
class AtlasConfig:
    """Sizes of one Atlas variant. ``dim = 4 * stem_features``; ``g`` = pooling per scale."""

    stem_in: int = 32
    stem_features: int = 24
    stem_blocks: int = 1
    heads: int = 3
    depths: tuple[int, ...] = (3,)
    window: int = 16
    g: int = 2
    mlp_ratio: float = 4.0
    pos_hidden: int = 128
    drop_path: float = 0.0
    min_scales: int = 2
    #: distinct per-scale blocks per MSA block; scales beyond share the last one, so a model
    #: trained on small crops (2 scales) still has trained weights for the extra scales of a
    #: large tile. Atlas itself does not share (set this >= the scales you will ever use).
    scale_blocks: int = 2

    @property
    def dim(self) -> int:
        return 4 * self.stem_features


ATLAS_CONFIGS: dict[str, AtlasConfig] = {
    # CPU-friendly; a 1024 px input has 3 scales (strides 16, 32, 64).
    "atlas_tiny": AtlasConfig(
        stem_in=32,
        stem_features=24,
        stem_blocks=1,
        heads=3,
        depths=(3,),
        g=2,
        pos_hidden=128,
        scale_blocks=2,
    ),
    # Sizes of Atlas-S are not published; this is a ViT-S-width guess (dim 384, 6 heads).
    "atlas_small": AtlasConfig(
        stem_in=64,
        stem_features=96,
        stem_blocks=2,
        heads=6,
        depths=(2, 6),
        g=4,
        pos_hidden=256,
        scale_blocks=3,
    ),
    # Atlas-B @1024 as released: dim 768, 12 heads, m=16, g=4, 2 + 10 blocks, scale dropping.
    "atlas_base": AtlasConfig(
        stem_in=64,
        stem_features=192,
        stem_blocks=3,
        heads=12,
        depths=(2, 10),
        g=4,
        pos_hidden=512,
        drop_path=0.3,
        scale_blocks=3,
    ),
    # For fast tests of other stages only.
    "atlas_test": AtlasConfig(
        stem_in=8, stem_features=8, stem_blocks=1, heads=2, depths=(1,), g=2, pos_hidden=16
    ),
}


# --------------------------------------------------------------------------------------------
# Layout: how many scales, which windows, who is whose parent (pure integer arithmetic)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScaleLayout:
    """One scale: token grid ``(h, w)``, window size ``(mh, mw)`` and window grid ``(gh, gw)``."""

    stride: int
    h: int
    w: int
    mh: int
    mw: int

    @property
    def gh(self) -> int:
        return self.h // self.mh

    @property
    def gw(self) -> int:
        return self.w // self.mw

    @property
    def n_windows(self) -> int:
        return self.gh * self.gw

    @property
    def tokens_per_window(self) -> int:
        return self.mh * self.mw


def num_scales(h: int, w: int, window: int, g: int, min_scales: int = 2) -> int:
    """Scales so the coarsest grid fits one ``window x window`` window (at least ``min_scales``)."""
    side = max(h, w)
    extra = 0
    while side > window * g**extra:
        extra += 1
    return max(min_scales, extra + 1)


def padded_grid(h: int, w: int, window: int, g: int, n_scales: int) -> tuple[int, int]:
    """Token grid padded so scales ``0..L-2`` split into whole windows and ``L-1`` pools exactly."""
    mult = window * g ** max(n_scales - 2, 0)
    mult = max(mult, g ** (n_scales - 1))
    return -(-h // mult) * mult, -(-w // mult) * mult


def scale_layouts(
    h: int, w: int, window: int, g: int, n_scales: int, stride0: int = 16
) -> list[ScaleLayout]:
    """Layouts for a padded stride-``stride0`` token grid ``(h, w)`` (see :func:`padded_grid`)."""
    out = []
    for s in range(n_scales):
        f = g**s
        if h % f or w % f:
            msg = f"token grid {h}x{w} is not divisible by g**{s}={f}; pad it with padded_grid()"
            raise ValueError(msg)
        hs, ws = h // f, w // f
        if s < n_scales - 1:
            if hs % window or ws % window:
                msg = f"scale {s} grid {hs}x{ws} is not a whole number of {window}x{window} windows"
                raise ValueError(msg)
            out.append(ScaleLayout(stride0 * f, hs, ws, window, window))
        else:  # the coarsest scale is one window (global attention at that scale)
            out.append(ScaleLayout(stride0 * f, hs, ws, hs, ws))
    return out


def parent_window_index(fine: ScaleLayout, coarse: ScaleLayout, batch: int = 1) -> torch.Tensor:
    """For every fine window (batch-major raster order) the index of the coarse window holding it.

    A fine window's top-left token ``(r*mh, c*mw)`` at the fine stride sits at pixel
    ``(r*mh*sf, c*mw*sf)``; its parent is the coarse window whose pixel box contains it. This is
    the spatial gather that fixes pitfall 1.8-1 (``repeat_interleave`` pairs window ``i`` with
    ``i // r``, which is wrong once the coarse scale has more than one window row).
    """
    rows = torch.arange(fine.gh) * fine.mh * fine.stride // (coarse.mh * coarse.stride)
    cols = torch.arange(fine.gw) * fine.mw * fine.stride // (coarse.mw * coarse.stride)
    per_image = (rows[:, None] * coarse.gw + cols[None, :]).flatten()
    offsets = torch.arange(batch)[:, None] * coarse.n_windows
    return (offsets + per_image[None, :]).flatten()


@dataclass(frozen=True)
class KeyWindow:
    """A window one probed query reads: tokens ``[row0, row0 + mh) x [col0, col0 + mw)`` of
    scale ``scale``'s padded grid, each ``stride`` input px square (so it covers input pixels
    ``[row0 * stride, (row0 + mh) * stride)`` x ``[col0 * stride, (col0 + mw) * stride)``)."""

    scale: int
    stride: int
    row0: int
    col0: int
    mh: int
    mw: int

    @property
    def tokens(self) -> int:
        return self.mh * self.mw


@dataclass(frozen=True)
class QueryProbe:
    """Ask ``Atlas.forward(x, want_attention=probe)`` for the top-down attention of one
    finest-scale token of image 0, per head, in every MSA block where scale 0 is present.

    ``window`` indexes the token's scale-0 window, ``token`` the token inside it (raster
    order); ``keys`` are the windows it reads, in key order: its own window first, then the
    parent window of every coarser scale, coarsest first (:class:`MSABlock`'s layout).
    Everything else runs on the fused kernel.
    """

    window: int
    token: int
    keys: tuple[KeyWindow, ...]


def query_probe(layouts: list[ScaleLayout], row: int, col: int) -> QueryProbe:
    """The probe for scale-0 token ``(row, col)`` of image 0 on the padded grid of ``layouts``."""
    fine = layouts[0]
    if not (0 <= row < fine.h and 0 <= col < fine.w):
        msg = f"token ({row}, {col}) is outside the {fine.h}x{fine.w} scale-0 token grid"
        raise ValueError(msg)
    window = (row // fine.mh) * fine.gw + col // fine.mw
    token = (row % fine.mh) * fine.mw + col % fine.mw

    def key(s: int, w: int) -> KeyWindow:
        lay = layouts[s]
        r, c = divmod(w, lay.gw)
        return KeyWindow(s, lay.stride, r * lay.mh, c * lay.mw, lay.mh, lay.mw)

    keys = [key(0, window)]
    for t in range(len(layouts) - 1, 0, -1):  # coarsest first, as MSABlock concatenates them
        keys.append(key(t, int(parent_window_index(fine, layouts[t])[window])))
    return QueryProbe(window, token, tuple(keys))


def to_windows(x: torch.Tensor, mh: int, mw: int) -> torch.Tensor:
    """(B, C, h, w) grid -> (B * nW, mh * mw, C) windows, raster order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // mh, mh, w // mw, mw).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b * (h // mh) * (w // mw), mh * mw, c)


def from_windows(x: torch.Tensor, batch: int, h: int, w: int, mh: int, mw: int) -> torch.Tensor:
    """Inverse of :func:`to_windows`: (B * nW, mh * mw, C) -> (B, C, h, w)."""
    c = x.shape[-1]
    x = x.reshape(batch, h // mh, w // mw, mh, mw, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(batch, c, h, w)


def window_coords(mh: int, mw: int, device: torch.device) -> torch.Tensor:
    """(mh * mw, 2) (row, col) of each token inside its window, scaled to [-1, 1)."""
    r = (torch.arange(mh, device=device, dtype=torch.float32) - mh / 2) / (mh / 2)
    c = (torch.arange(mw, device=device, dtype=torch.float32) - mw / 2) / (mw / 2)
    return torch.stack(torch.meshgrid(r, c, indexing="ij"), -1).reshape(-1, 2)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
class _ConvResidual(nn.Module):
    #: (conv, batch norm) attribute pairs applied as ``bn(conv(x))``: inference may fold them.
    fuse_pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c, eps=1e-4)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c, eps=1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.conv2(F.gelu(self.bn1(self.conv1(x)))))


class ConvStem(nn.Module):
    """Stride-16 conv stem; keeps the stride 2/4/8 features as a skip pyramid for dense heads."""

    def __init__(self, cfg: AtlasConfig) -> None:
        super().__init__()
        f = cfg.stem_features
        self.s2 = nn.Sequential(
            nn.Conv2d(3, cfg.stem_in, 3, 2, 1, bias=False),
            nn.BatchNorm2d(cfg.stem_in, eps=1e-4),
            nn.ReLU(),
        )
        self.s4 = nn.Sequential(
            nn.Conv2d(cfg.stem_in, f, 3, 2, 1, bias=False),
            nn.BatchNorm2d(f, eps=1e-4),
            nn.ReLU(),
            *[_ConvResidual(f) for _ in range(cfg.stem_blocks)],
        )
        self.s8 = nn.Sequential(
            LayerNorm2d(f),
            nn.Conv2d(f, 2 * f, 3, 2, 1, bias=False),
            *[_ConvResidual(2 * f) for _ in range(cfg.stem_blocks)],
        )
        self.s16 = nn.Sequential(LayerNorm2d(2 * f), nn.Conv2d(2 * f, 4 * f, 3, 2, 1, bias=False))
        self.channels = {2: cfg.stem_in, 4: f, 8: 2 * f, 16: 4 * f}

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        p2 = self.s2(x)
        p4 = self.s4(p2)
        p8 = self.s8(p4)
        return {2: p2, 4: p4, 8: p8, 16: self.s16(p8)}


class ScaleBlock(nn.Module):
    """Pre-norm cross-window attention + MLP for one scale of one MSA block."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, pos_hidden: int, drop_path: float
    ) -> None:
        super().__init__()
        if dim % heads:
            msg = f"dim {dim} is not divisible by heads {heads}"
            raise ValueError(msg)
        self.heads = heads
        self.norm_q, self.norm_kv, self.norm2 = (
            nn.LayerNorm(dim),
            nn.LayerNorm(dim),
            nn.LayerNorm(dim),
        )
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.pos = nn.Sequential(
            nn.Linear(2, pos_hidden), nn.ReLU(), nn.Linear(pos_hidden, dim, bias=False)
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """(B, n, C) -> (B, heads, n, C / heads), a view."""
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Queries (B, n, C), heads not yet split."""
        return self.q(self.norm_q(x))

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, n, C) each, heads not yet split (so gathers and concatenations
        move one tensor per source rather than per head)."""
        k, v = self.kv(self.norm_kv(x)).chunk(2, dim=-1)
        return k, v

    def query_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``query`` and ``keys_values`` of the same tokens with one normalisation and one GEMM.

        Both LayerNorms share the statistics of ``x``; their affine parts are folded into the
        projection weights (``W (x_hat * g + b) + c = (W * g) x_hat + (W b + c)``), which saves a
        pass over the largest tensor of the block.
        """
        nq, nkv = self.norm_q, self.norm_kv
        if (
            not (isinstance(nq, nn.LayerNorm) and isinstance(nkv, nn.LayerNorm))
            or nq.eps != nkv.eps
        ):
            return (self.query(x), *self.keys_values(x))
        c = x.shape[-1]
        xhat = F.layer_norm(x, (c,), eps=nq.eps)
        w = torch.cat([self.q.weight * nq.weight, self.kv.weight * nkv.weight])
        b = torch.cat(
            [self.q.weight @ nq.bias + self.q.bias, self.kv.weight @ nkv.bias + self.kv.bias]
        )
        q, k, v = F.linear(xhat, w.to(xhat.dtype), b.to(xhat.dtype)).split(c, dim=-1)
        return q, k, v

    def query_weights(
        self, q: torch.Tensor, k: torch.Tensor, window: int, token: int
    ) -> torch.Tensor:
        """Softmax weights (heads, m) of query ``token`` of window ``window`` over its keys;
        q (B, n, C), k (B, m, C). Computed in float32 at least (the weights are shown)."""
        dtype = torch.promote_types(q.dtype, torch.float32)
        qh = self._split(q[window : window + 1, token : token + 1].to(dtype))  # (1, h, 1, d)
        kh = self._split(k[window : window + 1].to(dtype))  # (1, h, m, d)
        with torch.autocast(q.device.type, enabled=False):  # bf16 autocast would round them
            scores = (qh * qh.shape[-1] ** -0.5) @ kh.transpose(-2, -1)
            return torch.softmax(scores, dim=-1)[0, :, 0]

    def attend(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        want_attention: bool | str,
        n_own: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Residual attention then residual MLP; q (B, n, C), k/v (B, m, C).

        Returns the new x and, when ``want_attention`` is true, the head-averaged weights
        (B, n, m); when it is ``"reliance"`` (and ``n_own`` is given: the first ``n_own`` keys
        are the query's own window), only (B, n, 1), the head-averaged attention mass on the
        keys after the first ``n_own`` (the coarser scales), computed inside the fused kernel.
        """
        q, k, v = self._split(q), self._split(k), self._split(v)
        weights = None
        if want_attention == "reliance" and n_own is not None:
            # One extra channel: q and k get a 0 (scores unchanged, the scale is given
            # explicitly), v gets 1 on the coarse keys, so the extra output channel is the
            # softmax mass on them, without materialising the (n, m) weights.
            d = q.shape[-1]
            ind = torch.zeros((*v.shape[:-1], 1), dtype=v.dtype, device=v.device)
            ind[..., n_own:, :] = 1
            o = F.scaled_dot_product_attention(
                F.pad(q, (0, 1)), F.pad(k, (0, 1)), torch.cat([v, ind], -1), scale=d**-0.5
            )
            weights = o[..., d:].mean(1)
            o = o[..., :d]
        elif want_attention and want_attention != "reliance":
            # Explicit softmax: the fused kernel never materialises the weights we want to show.
            a = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)
            o = a @ v
            weights = a.mean(1)
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).flatten(2)
        x = x + self.drop_path(self.proj(o))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, weights


class MSABlock(nn.Module):
    """One Multi-Scale Attention block: position MLP, max-pool residual, top-down, bottom-up."""

    def __init__(self, dim: int, heads: int, cfg: AtlasConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.g = cfg.g
        self.scales = nn.ModuleList(
            ScaleBlock(dim, heads, cfg.mlp_ratio, cfg.pos_hidden, drop_path)
            for _ in range(cfg.scale_blocks)
        )

    def forward(
        self,
        xs: list[torch.Tensor],
        layouts: list[ScaleLayout],
        batch: int,
        want_attention: bool | str | QueryProbe = False,
        first_scale: int = 0,
    ) -> tuple[list[torch.Tensor], dict[str, dict[int, torch.Tensor]]]:
        """``xs[s]``: (B * nW_s, K_s, C) windows of scale ``first_scale + s`` (finest first).

        Returns the updated xs and, when ``want_attention`` is true, head-averaged weights
        ``{"top_down": {s: (B*nW_s, K_s, K_s + sum K_t)},
        "bottom_up": {s: (B*nW_{s-1}, K_s', K_{s-1})}}``
        keyed by the local scale index ``s``; when it is ``"reliance"``, only
        ``{"reliance": {s: (B*nW_s, K_s, 1)}}``, the top-down attention mass each token puts on
        coarser scales (what :func:`context_reliance` needs, from the fused kernel); when it is
        a :class:`QueryProbe`, only ``{"query": {0: (heads, K_0 + sum K_t)}}`` for that one
        token (empty when scale 0 is not present), everything else on the fused kernel.
        """
        n = len(xs)
        last = len(self.scales) - 1
        blocks = [self.scales[min(first_scale + s, last)] for s in range(n)]
        xs = list(xs)
        probe = want_attention if isinstance(want_attention, QueryProbe) else None
        want_attention = False if probe is not None else want_attention  # probed on the side
        reliance = want_attention == "reliance"
        kinds = ("query",) if probe else ("reliance",) if reliance else ("top_down", "bottom_up")
        attn: dict[str, dict[int, torch.Tensor]] = {kind: {} for kind in kinds}
        for s in range(n):
            lay = layouts[s]
            coords = window_coords(lay.mh, lay.mw, xs[s].device).to(blocks[s].pos[0].weight.dtype)
            xs[s] = xs[s] + blocks[s].pos(coords).to(xs[s].dtype)
        # Bottom-up max-pool residual: each scale also sees the strongest responses below it.
        g = self.g
        for s in range(n - 1):
            fine, coarse = layouts[s], layouts[s + 1]
            # Pool inside each fine window (no full-size re-layout), then re-window the result.
            bw, _, c = xs[s].shape
            ph, pw = fine.mh // g, fine.mw // g
            pooled = xs[s].reshape(bw, ph, g, pw, g, c).amax(dim=(2, 4)).reshape(bw, ph * pw, c)
            grid = from_windows(pooled, batch, fine.h // g, fine.w // g, ph, pw)
            xs[s + 1] = xs[s + 1] + to_windows(grid, coarse.mh, coarse.mw)
        # Top-down: coarsest first; each scale attends to its own window and the already-updated
        # parent window of every coarser scale.
        kv_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for s in range(n - 1, -1, -1):
            q, k, v = blocks[s].query_keys_values(xs[s])
            ks, vs = [k], [v]
            for t in range(n - 1, s, -1):  # coarsest first, as documented for the key layout
                kt, vt = kv_cache[t]
                idx = parent_window_index(layouts[s], layouts[t], batch).to(kt.device)
                ks.append(kt[idx])
                vs.append(vt[idx])
            k_all = torch.cat(ks, 1) if len(ks) > 1 else k
            v_all = torch.cat(vs, 1) if len(vs) > 1 else v
            n_own = k.shape[1] if len(ks) > 1 else None
            if probe is not None and first_scale + s == 0:
                attn["query"][0] = blocks[s].query_weights(q, k_all, probe.window, probe.token)
            xs[s], a = blocks[s].attend(xs[s], q, k_all, v_all, want_attention, n_own)
            # Finer scales (and, for the finest, the first bottom-up step) read the updated tokens.
            if n > 1:
                kv_cache[s] = blocks[s].keys_values(xs[s])
            if a is not None:
                attn["reliance" if reliance else "top_down"][s] = a
        # Bottom-up cross-attention: coarse tokens grouped by the fine window they cover read it.
        for s in range(1, n):
            fine, coarse = layouts[s - 1], layouts[s]
            gm_h, gm_w = fine.mh // self.g, fine.mw // self.g
            q_grid = from_windows(xs[s], batch, coarse.h, coarse.w, coarse.mh, coarse.mw)
            grouped = to_windows(q_grid, gm_h, gm_w)  # (B * nW_{s-1}, (m/g)^2, C)
            q = blocks[s].query(grouped)
            # Scale s-1 is unchanged since its keys were last computed only when s-1 == 0.
            k, v = kv_cache[0] if s == 1 else blocks[s - 1].keys_values(xs[s - 1])
            out, a = blocks[s].attend(grouped, q, k, v, False if reliance else want_attention)
            out_grid = from_windows(out, batch, coarse.h, coarse.w, gm_h, gm_w)
            xs[s] = to_windows(out_grid, coarse.mh, coarse.mw)
            if a is not None:
                attn["bottom_up"][s] = a
        return xs, attn


class Atlas(nn.Module):
    """Conv stem + stages of MSA blocks (the finest scale is dropped after each stage but the last).

    ``forward(x)`` takes a normalised (B, 3, H, W) image, H and W multiples of 16, and returns a
    dict: ``"pyramid"`` {stride: (B, C, H/stride, W/stride)} with the stem's stride 2/4/8 features
    and the final finest-scale tokens at stride 16; ``"scales"`` a list of (B, dim, H/σ_s, W/σ_s)
    final tokens per scale (σ_s = 16 g^s; scales that only exist because of padding are cut back
    with ceil); ``"strides"`` the σ_s; ``"attention"`` (if asked) per block the head-averaged
    top-down/bottom-up weights plus ``"layouts"`` to interpret them.
    """

    stride = 16
    #: ``forward(..., want_attention="reliance")`` returns only the context reliance per token.
    supports_reliance = True

    def __init__(self, cfg: AtlasConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.stem = ConvStem(cfg)
        total = sum(cfg.depths)
        rates = [cfg.drop_path * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.ModuleList()
        i = 0
        for d in cfg.depths:
            self.stages.append(
                nn.ModuleList(MSABlock(dim, cfg.heads, cfg, rates[i + j]) for j in range(d))
            )
            i += d
        self.norm = nn.LayerNorm(dim)
        self.pyramid_channels = {**{k: v for k, v in self.stem.channels.items() if k < 16}, 16: dim}
        self.num_features = dim

    def layouts_for(self, h: int, w: int) -> tuple[list[ScaleLayout], tuple[int, int]]:
        """Scale layouts for a stride-16 grid ``h x w`` and the padded grid they use."""
        cfg = self.cfg
        n = num_scales(h, w, cfg.window, cfg.g, cfg.min_scales)
        ph, pw = padded_grid(h, w, cfg.window, cfg.g, n)
        return scale_layouts(ph, pw, cfg.window, cfg.g, n, self.stride), (ph, pw)

    def probe_at(self, height: int, width: int, y: int, x: int) -> QueryProbe:
        """The :class:`QueryProbe` of the finest token holding pixel ``(y, x)`` of a
        ``height x width`` px input (both multiples of the stride)."""
        if not (0 <= y < height and 0 <= x < width):
            msg = f"pixel ({y}, {x}) is outside the {height}x{width} px model input"
            raise ValueError(msg)
        layouts, _ = self.layouts_for(height // self.stride, width // self.stride)
        return query_probe(layouts, y // self.stride, x // self.stride)

    def forward(self, x: torch.Tensor, want_attention: bool | str | QueryProbe = False) -> dict:
        b, _, hh, ww = x.shape
        if hh % self.stride or ww % self.stride:
            msg = f"Atlas input {hh}x{ww} px must be a multiple of {self.stride} px; pad the tile"
            raise ValueError(msg)
        pyr = self.stem(x)
        out = self.forward_tokens(pyr[16], want_attention)
        out["pyramid"] = {2: pyr[2], 4: pyr[4], 8: pyr[8], 16: out["scales"][0]}
        return out

    def forward_tokens(
        self, tokens: torch.Tensor, want_attention: bool | str | QueryProbe = False
    ) -> dict:
        """MSA stages on stride-16 tokens (B, dim, h, w): ``scales``, ``strides`` (+ attention;
        ``want_attention="reliance"`` keeps only what :func:`context_reliance` needs, a
        :class:`QueryProbe` only that token's weights)."""
        b = tokens.shape[0]
        h, w = tokens.shape[-2:]
        layouts, (ph, pw) = self.layouts_for(h, w)
        if (ph, pw) != (h, w):
            # Zero tokens pad the grid to whole windows; outputs are cropped back below.
            tokens = F.pad(tokens, (0, pw - w, 0, ph - h))
        xs = [
            to_windows(F.max_pool2d(tokens, self.cfg.g**s) if s else tokens, lay.mh, lay.mw)
            for s, lay in enumerate(layouts)
        ]
        finals: dict[int, torch.Tensor] = {}
        attention: list[dict] = []
        first = 0  # index of the finest scale still present
        for si, stage in enumerate(self.stages):
            active = layouts[first:]
            for blk in stage:
                xs, a = blk(xs, active, b, want_attention, first)
                if want_attention:
                    # Re-key scales to absolute scale indices.
                    attention.append(
                        {k: {first + s: t for s, t in v.items()} for k, v in a.items()}
                    )
            if si < len(self.stages) - 1 and len(xs) > 1:
                finals[first] = xs[0]  # scale dropping: the finest scale leaves, keep its state
                xs = xs[1:]
                first += 1
        for s, t in enumerate(xs):
            finals[first + s] = t
        scales = []
        strides = []
        for s, lay in enumerate(layouts):
            grid = from_windows(self.norm(finals[s]), b, lay.h, lay.w, lay.mh, lay.mw)
            oh, ow = -(-h // self.cfg.g**s), -(-w // self.cfg.g**s)
            scales.append(grid[:, :, :oh, :ow])
            strides.append(lay.stride)
        out: dict = {"scales": scales, "strides": strides}
        if want_attention:
            out["attention"] = attention
            out["layouts"] = layouts
            out["grid"] = (h, w)
        return out

    def attention_maps(self, out: dict, batch: int) -> dict[int, torch.Tensor]:
        """Product heatmaps {scale: (B, h_s, w_s)} in [0, 1]: :func:`context_reliance`."""
        return context_reliance(out, batch)


def context_reliance(out: dict, batch: int) -> dict[int, torch.Tensor]:
    """Per scale ``s`` with a coarser scale: (B, h_s, w_s) fraction of the scale-``s`` tokens'
    top-down attention spent on coarser scales, averaged over blocks; in [0, 1].

    Needs ``out`` from ``Atlas.forward(..., want_attention=True)`` (or ``"reliance"``). The map
    is on the scale-``s`` token grid (stride σ_s px), cropped to the unpadded input.
    """
    layouts: list[ScaleLayout] = out["layouts"]
    h, w = out["grid"]
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for blk in out["attention"]:
        if "reliance" in blk:  # already reduced inside the fused kernel: (B*nW, K, 1)
            per_scale = dict(blk["reliance"])
        else:
            per_scale = {}
            for s, a in blk["top_down"].items():
                lay = layouts[s]
                if a.shape[-1] == lay.tokens_per_window:  # the coarsest present scale: no context
                    continue
                per_scale[s] = a[..., lay.tokens_per_window :].sum(-1, keepdim=True)
        for s, r in per_scale.items():
            lay = layouts[s]
            grid = from_windows(r.float(), batch, lay.h, lay.w, lay.mh, lay.mw)[:, 0]
            sums[s] = sums.get(s, 0) + grid
            counts[s] = counts.get(s, 0) + 1
    g = layouts[1].stride // layouts[0].stride if len(layouts) > 1 else 1
    result = {}
    for s in sorted(sums):
        oh, ow = -(-h // g**s), -(-w // g**s)
        result[s] = (sums[s] / counts[s])[:, :oh, :ow].clamp(0, 1)
    return result
