"""ViT backbones through timm: a PLUTO-style FlexiViT-S and pathology foundation ViTs.

PLUTO (Juyal et al., arXiv 2405.07905) is a FlexiViT-S: one set of weights for any patch size,
the patch kernel resized on the fly with the pseudo-inverse resize (timm's
``resample_patch_embed``) and the absolute position grid resampled to the input
(``dynamic_img_size``). No PLUTO weights are public, so the ``pluto-*`` entries are the
architecture only. Foundation ViTs (UNI, Virchow, H-optimus, ...) are loaded from a local
safetensors checkpoint or the local Hugging Face cache, never downloaded at run time.

Frames: patch tokens at stride ``p`` px of the model input; the CellViT-style pyramid adds
stride ``p/2 .. 2`` maps up-sampled from earlier blocks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_patch_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .card import WeightsError

__all__ = ["ViTBackbone", "flexivit_small", "load_timm_backbone"]


def flexivit_small(base_patch: int = 16, img_size: int = 224) -> VisionTransformer:
    """FlexiViT-S as in PLUTO: embed 384, depth 12, 6 heads, MLP 1536, CLS + learnable abs pos."""
    return VisionTransformer(
        img_size=img_size,
        patch_size=base_patch,
        embed_dim=384,
        depth=12,
        num_heads=6,
        mlp_ratio=4.0,
        qkv_bias=True,
        num_classes=0,
        dynamic_img_size=True,
        class_token=True,
        global_pool="token",
    )


def _pow2(n: int) -> bool:
    return n > 0 and not n & (n - 1)


class ViTBackbone(nn.Module):
    """A timm ``VisionTransformer`` run at patch size ``patch_size`` (FlexiViT resize of the
    stored kernel when it differs), exposing the shared backbone interface.

    ``forward(x)`` -> ``{"pyramid": {stride: map}, "scales": [patch tokens (B,E,H/p,W/p), class
    token (B,E,1,1)], "strides": [p, H], "cls": (B,E), "intermediates": [blocks ...]}``.
    Pyramid maps at strides ``p/2, p/4, ..., 2`` come from earlier blocks through 2x2
    transposed convolutions (CellViT's skip design).
    """

    def __init__(
        self, vit: VisionTransformer, patch_size: int = 16, extract: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        if not _pow2(patch_size) or patch_size < 4:
            msg = f"patch_size must be a power of two >= 4 for the dense heads, got {patch_size}"
            raise ValueError(msg)
        self.vit = vit
        self.patch_size = patch_size
        depth = len(vit.blocks)
        self.extract = tuple(extract or [depth * i // 4 for i in range(1, 5)])  # e.g. 3, 6, 9, 12
        e = vit.embed_dim
        self.num_features = e
        self.stride = patch_size
        n_up = patch_size.bit_length() - 2  # strides p/2 ... 2
        widths = [max(32, 256 >> i) for i in range(n_up)]
        self.skips = nn.ModuleList()
        self.pyramid_channels = {patch_size: e}
        for i in range(n_up):
            steps = i + 1
            layers: list[nn.Module] = []
            cin = e
            for j in range(steps):
                cout = widths[min(j, len(widths) - 1)] if j < steps - 1 else widths[i]
                layers += [
                    nn.ConvTranspose2d(cin, cout, 2, stride=2),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(),
                ]
                cin = cout
            self.skips.append(nn.Sequential(*layers))
            self.pyramid_channels[patch_size >> steps] = widths[i]

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.vit.patch_embed.proj
        w = proj.weight
        if tuple(w.shape[-2:]) != (self.patch_size, self.patch_size):
            w = resample_patch_embed(w, [self.patch_size, self.patch_size])
        t = F.conv2d(x, w, proj.bias, stride=self.patch_size)
        return self.vit.patch_embed.norm(t.permute(0, 2, 3, 1))  # NHWC, as dynamic_img_size expects

    def forward(self, x: torch.Tensor, want_attention: bool = False) -> dict[str, Any]:
        b, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            msg = f"ViT input {h}x{w} px must be a multiple of the patch size {p}"
            raise ValueError(msg)
        gh, gw = h // p, w // p
        t = self.vit.norm_pre(self.vit._pos_embed(self._embed(x)))
        npre = self.vit.num_prefix_tokens
        inter = []
        for i, blk in enumerate(self.vit.blocks, start=1):
            t = blk(t)
            if i in self.extract:
                inter.append(t)
        t = self.vit.norm(t)

        def grid(z: torch.Tensor) -> torch.Tensor:
            return z[:, npre:].transpose(1, 2).reshape(b, -1, gh, gw)

        tokens = grid(t)
        cls = t[:, 0] if npre else tokens.mean((2, 3))
        pyramid = {p: tokens}
        earlier = inter[:-1][::-1]  # deepest earlier block feeds the finest-but-one stride
        for i, skip in enumerate(self.skips):
            src = earlier[min(i, len(earlier) - 1)] if earlier else t
            pyramid[p >> (i + 1)] = skip(grid(src))
        return {
            "pyramid": pyramid,
            "scales": [tokens, cls[:, :, None, None]],
            "strides": [p, max(h, w)],
            "cls": cls,
            "intermediates": [grid(z) for z in inter],
        }


def load_timm_backbone(
    timm_name: str,
    *,
    checkpoint: str | Path | None = None,
    hf_hub_id: str | None = None,
    timm_kwargs: dict[str, Any] | None = None,
) -> VisionTransformer:
    """Build ``timm_name`` and fill it from a local safetensors ``checkpoint`` or, failing
    that, from the local Hugging Face cache of ``hf_hub_id`` (offline; nothing is downloaded).
    """
    kwargs = {"num_classes": 0, "dynamic_img_size": True, **(timm_kwargs or {})}
    if checkpoint is not None:
        from ._model import read_safetensors

        model = timm.create_model(timm_name, pretrained=False, **kwargs)
        state = read_safetensors(checkpoint)
        # Checkpoints are sometimes saved from a wrapper; strip one common prefix.
        for prefix in ("model.", "backbone.", "vit."):
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            msg = (
                f"checkpoint {checkpoint} does not fit timm model {timm_name!r}: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}; "
                "pass the checkpoint of this "
                "architecture (timm state-dict names, safetensors)"
            )
            raise WeightsError(msg)
        model.load_state_dict(state, strict=True)
        return model
    if hf_hub_id is None:
        msg = f"no checkpoint given for {timm_name!r}; pass weights=<path to .safetensors>"
        raise WeightsError(msg)
    cached = _cached_hub_file(hf_hub_id)
    if cached is None:
        msg = (
            f"no checkpoint for {timm_name!r}: weights of {hf_hub_id} are not in the local "
            f"Hugging Face cache (HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}); "
            f"download them once with `huggingface-cli download {hf_hub_id} model.safetensors` "
            "(after accepting the model's "
            "licence) or pass weights=<local .safetensors checkpoint>"
        )
        raise WeightsError(msg)
    return load_timm_backbone(timm_name, checkpoint=cached, timm_kwargs=timm_kwargs)


def _cached_hub_file(repo_id: str, filename: str = "model.safetensors") -> Path | None:
    """``filename`` of ``repo_id`` in the local HF cache, or None; never uses the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, filename)
    return Path(found) if isinstance(found, str) else None
