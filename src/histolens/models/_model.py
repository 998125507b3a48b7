"""The full model (backbone + heads), its numpy-in/numpy-out inference call, and weight I/O.

Frames: every output of :meth:`HistoLensModel.predict_tiles` is on the model-input pixel grid
(the tile as given, at ``card.mpp`` um/px); coarser maps are indexed so that output pixel
``(i, j)`` covers input pixels ``[i*s, (i+1)*s) x [j*s, (j+1)*s)``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._paths import card_path_for, file_sha256
from .card import ALL_TASKS, ModelCard, WeightsError
from .heads import NucleiDecoder, TileClassHead
from .precision import resolve_precision

__all__ = [
    "HistoLensModel",
    "card_path_for",
    "default_device",
    "file_sha256",
    "load_model_weights",
    "save_model_weights",
]


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA, then Apple MPS, then CPU."""
    if device is not None:
        try:
            return torch.device(device)
        except RuntimeError as exc:
            msg = f"unknown device {device!r} ({exc}); choose 'cpu', 'cuda', 'cuda:N' or 'mps'"
            raise ValueError(msg) from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


#: Largest model (parameter bytes) for which inference keeps a folded/cast copy of itself.
FAST_COPY_MAX_BYTES = 256 * 2**20


def fold_batchnorms(module: nn.Module) -> nn.Module:
    """Fold eval-mode BatchNorms into the convolution before them, in place; returns ``module``.

    Only pairs whose order is certain are folded: a ``Conv2d`` directly followed by a
    ``BatchNorm2d`` in an ``nn.Sequential``, and the ``fuse_pairs`` a module declares (attribute
    names of a conv and the batch norm applied right after it). ``W' = W * g / sqrt(var + eps)``,
    ``b' = (b - mean) * g / sqrt(var + eps) + beta``: the same function with one pass less
    over the (largest, full-resolution) activations.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for child in module.children():
        fold_batchnorms(child)
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for a, b in itertools.pairwise(names):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[a] = fuse_conv_bn_eval(conv.eval(), bn.eval())
                module._modules[b] = nn.Identity()
    for conv_name, bn_name in getattr(module, "fuse_pairs", ()):
        conv, bn = getattr(module, conv_name), getattr(module, bn_name)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            setattr(module, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
            setattr(module, bn_name, nn.Identity())
    return module


def relu_in_place(module: nn.Module) -> nn.Module:
    """Make every ``nn.ReLU`` that follows a convolution (or its folded batch norm) in an
    ``nn.Sequential`` work in place; returns ``module``.

    Its input is then the convolution's fresh output, used by nothing else, so the result
    is the same while a full-resolution activation is neither allocated nor written twice
    (on CPU the out-of-place ReLUs of the decoder cost about as much as its convolutions).
    """
    for seq in module.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        mods = list(seq)
        for prev, cur in itertools.pairwise(mods):
            if isinstance(cur, nn.ReLU) and isinstance(prev, nn.Conv2d | nn.BatchNorm2d):
                cur.inplace = True
            elif isinstance(cur, nn.ReLU) and isinstance(prev, nn.Identity):
                i = mods.index(prev)
                if i > 0 and isinstance(mods[i - 1], nn.Conv2d):
                    cur.inplace = True
    return module


class HistoLensModel(nn.Module):
    """A backbone plus nuclei and tile-class heads, described by a frozen :class:`ModelCard`.

    ``forward(x)`` (training) takes a normalised float tensor (B, 3, H, W) -- see
    :meth:`preprocess` -- with H, W multiples of ``card.input_multiple`` and returns
    ``nuclei_logits`` (B,1,H,W), ``hv`` (B,2,H,W) (raw regression, trained against HV targets in
    [-1, 1]), ``type_logits`` (B,T,H,W), ``tile_logits`` (B,C,H/c,W/c), ``embeddings``
    (B,D,H/c,W/c) with ``c = card.class_cell_px``.
    """

    def __init__(
        self,
        card: ModelCard,
        backbone: nn.Module,
        nuclei_head: NucleiDecoder | None,
        tile_head: TileClassHead | None,
    ) -> None:
        super().__init__()
        self.card = card
        self.backbone = backbone
        self.nuclei_head = nuclei_head
        self.tile_head = tile_head
        self.register_buffer("mean", torch.tensor(card.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(card.std).view(1, 3, 1, 1), persistent=False)

    # -- plumbing -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def preprocess(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) RGB -> normalised float32 (B, 3, H, W) on the model's device."""
        t = torch.as_tensor(np.ascontiguousarray(tiles) if isinstance(tiles, np.ndarray) else tiles)
        t = t.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        return (t - self.mean) / self.std

    def _check_input(self, h: int, w: int) -> None:
        m = self.card.input_multiple
        if h % m or w % m or h == 0 or w == 0:
            msg = (
                f"model {self.card.name!r} needs tiles whose height and width are multiples of "
                f"card.input_multiple={m} px (at {self.card.mpp} um/px), got {h}x{w}; pad the tile"
            )
            raise ValueError(msg)

    def _features(self, x: torch.Tensor, want_attention: bool | str = False) -> dict:
        return self.backbone(x, want_attention=want_attention)

    def _heads(
        self,
        x: torch.Tensor,
        feats: dict,
        tasks: Iterable[str],
        crop: tuple[int, int, int, int] | None = None,
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        scales = feats["scales"]
        if "nuclei" in tasks and self.nuclei_head is not None:
            context = scales[min(1, len(scales) - 1)]
            out.update(self.nuclei_head(x, feats["pyramid"], context, crop))
        if "tiles" in tasks and self.tile_head is not None:
            out.update(self.tile_head(scales[:2], x.shape[-2:]))
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_input(*x.shape[-2:])
        return self._heads(x, self._features(x), ("nuclei", "tiles"))

    # -- inference ------------------------------------------------------------------------
    def _weights_version(self) -> tuple:
        """Changes whenever a parameter or buffer is replaced or updated in place (an optimiser
        step, ``load_state_dict``, ``.to()``), so a cached inference copy is never stale."""
        return tuple(
            (t.data_ptr(), t._version, str(t.dtype), str(t.device))
            for t in (*self.parameters(), *self.buffers())
        )

    def __getstate__(self) -> dict[str, Any]:
        # The inference copies are a per-process cache, rebuilt on first use: a pickled model
        # (e.g. shipped to a dask worker) carries only its own weights.
        state = super().__getstate__()
        state.pop("_inference_copies", None)
        return state

    def inference_copy(self, dtype: torch.dtype = torch.float32) -> HistoLensModel | None:
        """A cached eval copy for inference: BatchNorms folded into convolutions, weights in
        ``dtype`` (bf16 runs natively, no per-op autocast casts), channels-last memory format
        (what oneDNN convolutions want on CPU). None when the model is too large to copy
        (> ``FAST_COPY_MAX_BYTES``); predict_tiles then runs the model itself under autocast.

        fp32 outputs equal the model's own up to float rounding (BN folding), see
        ``tests/test_models.py``. The copy is rebuilt when the weights change.
        """
        size = sum(t.numel() * t.element_size() for t in self.parameters())
        if size > FAST_COPY_MAX_BYTES:
            return None
        # Keyed by the dtype's name: plain data, whatever serialiser meets this dict.
        key = str(dtype).removeprefix("torch.")
        cache = self.__dict__.setdefault("_inference_copies", {})
        version = self._weights_version()
        hit = cache.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        cache.pop(key, None)
        fast = copy.deepcopy(self).eval()  # without the cache of copies (see __getstate__)
        fold_batchnorms(fast)
        relu_in_place(fast)
        fast = fast.to(dtype=dtype, memory_format=torch.channels_last)
        fast.mean, fast.std = self.mean.clone(), self.std.clone()  # normalisation stays fp32
        for p in fast.parameters():
            p.requires_grad_(False)
        cache[key] = (version, fast)
        return fast

    def _run_dtype(self, precision: str) -> torch.dtype:
        """The dtype ``precision`` runs in on this model's device (one owner: resolve_precision)."""
        resolved = resolve_precision(self.device.type, precision)
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[resolved]

    #: ``predict_tiles`` takes ``nuclei_box`` (the engine decodes nuclei only where it keeps them)
    supports_nuclei_box = True

    def _decoder_crop(
        self, box: tuple[int, int, int, int], h: int, w: int
    ) -> tuple[int, int, int, int] | None:
        """The decoder crop (input px) whose outputs inside ``box`` equal a full decode: the box
        grown by the decoder's reach, aligned to its coarsest stride, clipped to the input."""
        y0, x0, y1, x1 = (int(v) for v in box)
        if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
            msg = (
                f"nuclei_box {box} (y0, x0, y1, x1) must be a non-empty box inside the {h}x{w} tile"
            )
            raise ValueError(msg)
        head = self.nuclei_head
        a, reach = head.top, head.receptive_px
        if h % a or w % a:
            return None
        return (
            max(0, (y0 - reach) // a * a),
            max(0, (x0 - reach) // a * a),
            min(h, -(-(y1 + reach) // a) * a),
            min(w, -(-(x1 + reach) // a) * a),
        )

    def predict_tiles(
        self,
        tiles: np.ndarray,
        *,
        tasks: Iterable[str] = ALL_TASKS,
        precision: str = "auto",
        query: tuple[int, int] | None = None,
        nuclei_box: tuple[int, int, int, int] | None = None,
    ) -> dict[str, Any]:
        """Run the model on uint8 RGB tiles (B, H, W, 3) at ``card.mpp``; numpy float32 out.

        ``nuclei_box`` ``(y0, x0, y1, x1)`` (input px, the same for every tile): the nuclei
        maps are decoded only over that box plus the decoder's reach and returned for the box
        (shape ``(B, y1 - y0, x1 - x0)``); equal to the full maps cropped, up to float rounding.
        The backbone still sees the whole tile (its context).

        Returns (only for the requested tasks the card supports): ``nuclei_prob`` (B,H,W) in
        [0,1]; ``hv`` (B,2,H,W) in [-1,1], channel 0 = x, 1 = y; ``type_prob`` (B,T,H,W);
        ``tile_probs`` (B,H/c,W/c,C); ``embeddings`` (B,H/c,W/c,D); ``attention`` {scale:
        (B,H/s,W/s)} in [0,1] with ``s = card.attention_strides[scale]`` (scales that exist at
        this tile size; a coarse scale needs a large enough tile).

        ``query`` = pixel ``(y, x)`` of a single tile (B = 1) asks instead of ``attention`` for
        ``query_attention`` (L, heads, keys): the top-down attention weights of the finest
        backbone token holding that pixel in each of the L MSA blocks where it exists, and
        ``query_keys``, the :class:`~histolens.models.atlas.KeyWindow` s of those keys, in order.
        Only that token's weights are computed explicitly; the rest runs the fused kernel.
        """
        tasks, arr = self._checked(tiles, tasks)
        b, h, w, _ = arr.shape
        probe = None if query is None else self._query_probe(b, h, w, query)
        want_attention = (
            probe is None and "attention" in tasks and hasattr(self.backbone, "attention_maps")
        )
        crop = None
        if nuclei_box is not None and "nuclei" in tasks and self.nuclei_head is not None:
            crop = self._decoder_crop(nuclei_box, h, w)
        dtype = self._run_dtype(precision)
        fast = self.inference_copy(dtype)
        net = fast if fast is not None else self
        attention_mode: Any = probe if probe is not None else want_attention
        # Atlas reduces its attention to the per-token context reliance inside the fused kernel.
        if want_attention and getattr(net.backbone, "supports_reliance", False):
            attention_mode = "reliance"
        was_training = self.training
        self.eval()
        try:
            with (
                torch.inference_mode(),
                torch.autocast(
                    self.device.type, dtype=dtype, enabled=dtype != torch.float32 and fast is None
                ),
            ):
                x = self.preprocess(arr)  # (B, 3, H, W) fp32, channels-last strides (from BHWC)
                if fast is not None:
                    x = x.to(next(fast.parameters()).dtype)
                feats = net._features(x, attention_mode)
                raw = net._heads(x, feats, tasks, crop)
                maps = net.backbone.attention_maps(feats, b) if want_attention else {}
        finally:
            self.train(was_training)
        if "nuclei_logits" in raw and nuclei_box is not None:
            # The box in the frame of the decoded maps, which start at the decoder crop's corner.
            cy, cx = (crop[0], crop[1]) if crop is not None else (0, 0)
            y0, x0, y1, x1 = (int(v) for v in nuclei_box)
            raw = _cropped_nuclei(raw, (y0 - cy, x0 - cx, y1 - cy, x1 - cx))
        out = _head_outputs(raw)
        if want_attention:
            out["attention"] = self._attention_out(maps, h, w)
        if probe is not None:
            per_block = [a["query"][0] for a in feats["attention"] if 0 in a.get("query", {})]
            out["query_attention"] = _np(torch.stack(per_block))
            out["query_keys"] = probe.keys
        return out

    def _checked(self, tiles: np.ndarray, tasks: Iterable[str]) -> tuple[tuple[str, ...], Any]:
        """The asked tasks this card offers, and ``tiles`` as checked uint8 (B, H, W, 3)."""
        tasks = tuple(tasks)
        bad = set(tasks) - set(ALL_TASKS)
        if bad:
            msg = f"unknown tasks {sorted(bad)}; choose from {ALL_TASKS}"
            raise ValueError(msg)
        arr = np.asarray(tiles)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            msg = f"predict_tiles expects uint8 RGB tiles (B, H, W, 3), got {arr.dtype} {arr.shape}"
            raise ValueError(msg)
        self._check_input(*arr.shape[1:3])
        return tuple(t for t in tasks if t in self.card.tasks), arr

    @property
    def has_cross_scale_attention(self) -> bool:
        """True when the backbone attends across scales and can report one token's weights
        (Atlas); a plain ViT cannot."""
        return hasattr(self.backbone, "probe_at")

    def _query_probe(self, b: int, h: int, w: int, query: tuple[int, int]) -> Any:
        if not self.has_cross_scale_attention:
            msg = (
                f"model {self.card.name!r} (backbone {self.card.backbone!r}) has no cross-scale "
                "attention to explain; use an Atlas-based model such as 'histolens-default'"
            )
            raise ValueError(msg)
        if b != 1:
            msg = f"a query needs exactly one tile, got a batch of {b}"
            raise ValueError(msg)
        return self.backbone.probe_at(h, w, int(query[0]), int(query[1]))

    def _attention_out(self, maps: dict[int, torch.Tensor], h: int, w: int) -> dict:
        """Heatmaps {scale: (B, h/s, w/s)} for the scales the card exports, checked against it."""
        strides = self.card.attention_strides
        att = {}
        for s, m in maps.items():
            if s >= len(strides):
                continue  # a scale the card does not export
            stride = strides[s]
            if -(-h // m.shape[-2]) != stride:
                msg = (
                    f"model card {self.card.name!r} says attention scale {s} has stride "
                    f"{stride} px, but the backbone made a {m.shape[-2]}-row map for {h} px; "
                    "fix card.attention_strides"
                )
                raise ValueError(msg)
            att[s] = _np(m.float()[:, : h // stride, : w // stride])
        return att


def _cropped_nuclei(raw: dict[str, Any], box: tuple[int, int, int, int]) -> dict[str, Any]:
    """``raw`` with its nuclei maps (logits, HV, type logits) cut to ``box`` (their own px)."""
    y0, x0, y1, x1 = box
    nuclei_keys = ("nuclei_logits", "hv", "type_logits")
    return {k: v[..., y0:y1, x0:x1] if k in nuclei_keys else v for k, v in raw.items()}


def _head_outputs(raw: dict[str, Any]) -> dict[str, Any]:
    """The heads' logits as numpy float32: probabilities, HV maps in [-1, 1], channels last
    for the tile maps (the layout :meth:`HistoLensModel.predict_tiles` documents)."""
    out: dict[str, Any] = {}
    if "nuclei_logits" in raw:
        out["nuclei_prob"] = _np(torch.sigmoid(raw["nuclei_logits"].float())[:, 0])
        out["hv"] = _np(raw["hv"].float().clamp(-1, 1))
        out["type_prob"] = _np(torch.softmax(raw["type_logits"].float(), 1))
    if "tile_logits" in raw:
        out["tile_probs"] = _np(torch.softmax(raw["tile_logits"].float(), 1).permute(0, 2, 3, 1))
        out["embeddings"] = _np(raw["embeddings"].float().permute(0, 2, 3, 1))
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


# ------------------------------------------------------------------------------------------
# Weights I/O: safetensors only (no pickle), sha256 checked against the card
# ------------------------------------------------------------------------------------------
def save_model_weights(
    model: HistoLensModel, path: str | Path, *, card: ModelCard | None = None, **card_changes: Any
) -> ModelCard:
    """Write ``model``'s weights to ``path`` (``.safetensors``) and its card beside it.

    The card (``card`` or ``model.card``, with ``card_changes`` applied, e.g. ``metrics=...``)
    gets the file's sha256 and is written to ``<name>.card.json``. Returns that card and sets
    it on the model.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        msg = f"weights file {path} must end in .safetensors (the only format histolens loads)"
        raise ValueError(msg)
    card = (card or model.card).replace(**card_changes) if card_changes else (card or model.card)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"histolens_model": card.name, "format": "histolens-v1"})
    card = card.replace(weights_sha256=file_sha256(path))
    card.to_json(card_path_for(path))
    model.card = card
    return card


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, with a clear error when it is missing or not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        msg = (
            f"weights file {path} does not exist; check the path or rebuild it with "
            "`histolens train`"
        )
        raise WeightsError(msg)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        msg = (
            f"{path} is not a readable safetensors file ({exc}); histolens loads only .safetensors "
            "(never pickles) -- re-export it with save_model_weights() or "
            "safetensors.torch.save_file"
        )
        raise WeightsError(msg) from None


def load_model_weights(
    model: nn.Module, path: str | Path, *, expected_sha256: str = "", prefix: str = ""
) -> nn.Module:
    """Load a safetensors file into ``model`` (or into its sub-module ``prefix``), strictly.

    ``expected_sha256`` (usually ``card.weights_sha256``) is checked first; a mismatch, missing
    or unexpected tensor names and shape mismatches raise :class:`WeightsError` naming the file.
    """
    path = Path(path)
    if expected_sha256:
        got = file_sha256(path) if path.is_file() else None
        if got is not None and got != expected_sha256:
            msg = (
                f"weights file {path} has sha256 {got[:16]}..., but its model card expects "
                f"{expected_sha256[:16]}...; the file or the card was changed or mixed up -- "
                "re-save both together with save_model_weights()"
            )
            raise WeightsError(msg)
    tensors = read_safetensors(path)
    target = model.get_submodule(prefix) if prefix else model
    own = target.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(
        k for k in set(own) & set(tensors) if tuple(own[k].shape) != tuple(tensors[k].shape)
    )
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} with wrong shapes (e.g. {k}: file {tuple(tensors[k].shape)} "
                f"vs model {tuple(own[k].shape)})"
            )
        msg = (
            f"weights file {path} does not match the {type(target).__name__} architecture: "
            + "; ".join(parts)
            + ". Use the model name the weights were trained for, or retrain/re-save them."
        )
        raise WeightsError(msg)
    target.load_state_dict(tensors, strict=True)
    return model


def build_heads(
    card: ModelCard,
    backbone: nn.Module,
    *,
    decoder_widths: Mapping[int, int] | None = None,
    decoder_refine: bool = False,
    embed_dim: int | None = None,
) -> tuple[NucleiDecoder | None, TileClassHead | None]:
    """Heads sized from the backbone's ``pyramid_channels`` and ``num_features`` and the card."""
    c = backbone.num_features
    nuclei = (
        NucleiDecoder(
            backbone.pyramid_channels,
            c,
            len(card.nucleus_types),
            dict(decoder_widths or {}),
            refine=decoder_refine,
        )
        if "nuclei" in card.tasks
        else None
    )
    tiles = (
        TileClassHead([c, c], embed_dim or c, len(card.tissue_classes), card.class_cell_px)
        if "tiles" in card.tasks
        else None
    )
    return nuclei, tiles
