"""The registered models: cards plus builders (torch imported only inside the builders)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._registry import DEFAULT_MODEL, WEIGHTS_DIR, register_model
from .card import ModelCard, WeightsError

if TYPE_CHECKING:
    from ._model import HistoLensModel

__all__ = ["CONSEP_TYPES", "KATHER_CLASSES", "register_foundation_model"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: CoNSeP's merged 4-class scheme (HoVer-Net paper), background excluded.
CONSEP_TYPES = ("other", "inflammatory", "epithelial", "spindle-shaped")
CONSEP_COLORS = ((255, 165, 0), (220, 20, 20), (20, 180, 20), (30, 110, 255))
#: Kather et al. 2016 colorectal texture classes, TFDS order.
KATHER_CLASSES = (
    "tumour",
    "stroma",
    "complex stroma",
    "lymphocytes",
    "debris",
    "mucosa",
    "adipose",
    "empty",
)
KATHER_COLORS = (
    (200, 30, 30),
    (240, 150, 190),
    (150, 80, 160),
    (40, 40, 200),
    (130, 120, 40),
    (255, 200, 0),
    (250, 240, 190),
    (225, 225, 225),
)

_SEED = 0


def _build_atlas(
    card: ModelCard,
    *,
    config: str,
    decoder_widths: dict[int, int] | None = None,
    decoder_refine: bool = False,
    seed: int | None = _SEED,
) -> HistoLensModel:
    import torch

    from ._model import HistoLensModel, build_heads
    from .atlas import ATLAS_CONFIGS, Atlas

    # A fixed seed makes "random" architectures reproducible across runs and processes.
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        backbone = Atlas(ATLAS_CONFIGS[config])
        nuclei, tiles = build_heads(
            card, backbone, decoder_widths=decoder_widths, decoder_refine=decoder_refine
        )
    return HistoLensModel(card, backbone, nuclei, tiles)


def _build_pluto(card: ModelCard, *, patch: int, seed: int | None = _SEED) -> HistoLensModel:
    import torch

    from ._model import HistoLensModel, build_heads
    from .pluto import ViTBackbone, flexivit_small

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        backbone = ViTBackbone(flexivit_small(), patch_size=patch)
        nuclei, tiles = build_heads(
            card, backbone, decoder_widths={16: 256, 8: 128, 4: 64, 2: 32, 1: 16}
        )
    return HistoLensModel(card, backbone, nuclei, tiles)


def _resolve_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    # Layer classes are named as strings so the registry stays torch-free.
    out = dict(kwargs)
    if out.get("mlp_layer") == "SwiGLUPacked":
        from timm.layers import SwiGLUPacked

        out["mlp_layer"] = SwiGLUPacked
    if out.get("act_layer") == "SiLU":
        import torch

        out["act_layer"] = torch.nn.SiLU
    return out


def _is_full_model_file(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return any(
                k.startswith(("backbone.vit.", "nuclei_head.", "tile_head.")) for k in f.keys()
            )
    except Exception:  # not a safetensors file: let the real loader raise its clear error
        return False


def _build_foundation(
    card: ModelCard,
    *,
    checkpoint: Path | None,
    pretrained: bool,
    timm_name: str,
    hf_hub_id: str | None,
    timm_kwargs: dict[str, Any],
    patch: int = 16,
) -> HistoLensModel:
    import timm
    import torch

    from ._model import HistoLensModel, build_heads, load_model_weights
    from .pluto import ViTBackbone, load_timm_backbone

    kwargs = _resolve_kwargs(timm_kwargs)
    full = (
        checkpoint is not None
        and Path(checkpoint).is_file()
        and _is_full_model_file(Path(checkpoint))
    )
    if not pretrained or full:
        vit = timm.create_model(
            timm_name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs
        )
    else:
        if checkpoint is not None and not Path(checkpoint).is_file():
            msg = (
                f"checkpoint {checkpoint} for {card.name!r} does not exist; "
                "pass a local .safetensors file"
            )
            raise WeightsError(msg)
        vit = load_timm_backbone(
            timm_name, checkpoint=checkpoint, hf_hub_id=hf_hub_id, timm_kwargs=kwargs
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        backbone = ViTBackbone(vit, patch_size=patch)
        nuclei, tiles = build_heads(
            card, backbone, decoder_widths={16: 256, 8: 128, 4: 64, 2: 32, 1: 16}
        )
    model = HistoLensModel(card, backbone, nuclei, tiles)
    if full:
        load_model_weights(model, checkpoint, expected_sha256=card.weights_sha256)
    return model


def register_foundation_model(
    name: str,
    timm_name: str,
    *,
    hf_hub_id: str | None,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    mpp: float = 0.5,
    licence: str = "see the model's Hugging Face page",
    timm_kwargs: dict[str, Any] | None = None,
    patch: int = 16,
    description: str = "",
) -> None:
    """Register a timm foundation ViT (backbone weights from a local checkpoint or the HF cache)
    with the shared nuclei/tile heads (untrained until `histolens train` fits them)."""
    card = ModelCard(
        name=name,
        backbone=timm_name,
        mpp=mpp,
        tile_size=512,
        halo=64,
        input_multiple=64,
        mean=mean,
        std=std,
        tasks=("nuclei", "tiles"),
        nucleus_types=CONSEP_TYPES,
        nucleus_colors=CONSEP_COLORS,
        tissue_classes=KATHER_CLASSES,
        tissue_colors=KATHER_COLORS,
        class_cell_px=64,
        licence=licence,
        description=description
        or f"{timm_name} foundation backbone ({hf_hub_id or 'local checkpoint'}); "
        "patch kernel FlexiViT-resized to 16 px; heads need training",
    )
    register_model(
        card,
        foundation=True,
        timm_name=timm_name,
        hf_hub_id=hf_hub_id,
        timm_kwargs=dict(timm_kwargs or {}),
        patch=patch,
    )(_build_foundation)


#: sha256 of the embedded ``histolens-default.safetensors``: checked on load even if the
#: card beside it is lost or emptied (a release that replaces the file updates it here too;
#: tests/test_weights_integrity.py compares the two).
DEFAULT_WEIGHTS_SHA256 = "6a4b3029b22738b701e11ee7a268c539487c4f92976fbd9182ef633d7d114daa"

_DEFAULT_CARD = ModelCard(
    name=DEFAULT_MODEL,
    backbone="atlas_tiny",
    mpp=0.5,
    tile_size=1024,
    halo=128,
    input_multiple=64,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    tasks=("nuclei", "tiles", "attention"),
    nucleus_types=CONSEP_TYPES,
    nucleus_colors=CONSEP_COLORS,
    tissue_classes=KATHER_CLASSES,
    tissue_colors=KATHER_COLORS,
    class_cell_px=64,
    attention_strides=(16, 32),
    licence="code BSD-3-Clause; weights follow their training data (see training_data)",
    training_data="not trained yet",
    recipe="histolens train (the project's recipe)",
    description="Atlas-tiny (MSA, dim 96, 3 scales at 1024 px) + HoVer-style nuclei decoder "
    "(refined, with an HV branch) + tile-class head",
    weights_sha256=DEFAULT_WEIGHTS_SHA256,
)
register_model(
    _DEFAULT_CARD,
    weights=WEIGHTS_DIR / f"{DEFAULT_MODEL}.safetensors",
    requires_weights=True,
    config="atlas_tiny",
    # Refined decoder (second convolutions, separate HV branch): +0.02 held-out AJI over the
    # plain {16: 96, ..., 1: 16} decoder with the same backbone (docs/model-card.md).
    decoder_widths={16: 128, 8: 96, 4: 64, 2: 48, 1: 32},
    decoder_refine=True,
)(_build_atlas)

register_model(
    ModelCard(
        name="test-tiny",
        backbone="atlas_test",
        mpp=0.5,
        tile_size=256,
        halo=32,
        input_multiple=32,
        tasks=("nuclei", "tiles", "attention"),
        nucleus_types=("nucleus", "other"),
        nucleus_colors=((255, 0, 0), (0, 0, 255)),
        tissue_classes=("tissue", "background", "other"),
        tissue_colors=((200, 0, 0), (240, 240, 240), (0, 150, 0)),
        class_cell_px=32,
        attention_strides=(16,),
        licence="BSD-3-Clause",
        training_data="none (seeded random weights)",
        description="very small seeded random model for fast tests of other stages; "
        "outputs are meaningless",
    ),
    config="atlas_test",
    decoder_widths={16: 32, 8: 16, 4: 16, 2: 8, 1: 8},
)(_build_atlas)

for _cfg, _desc in (
    ("atlas_small", "Atlas-S-like (dim 384, 6 heads, g=4)"),
    ("atlas_base", "Atlas-B (dim 768, 12 heads, g=4, 2+10 blocks)"),
):
    # Same input, types and classes as the default model; g=4 puts scale 1 at stride 64.
    register_model(
        _DEFAULT_CARD.replace(
            name=_cfg.replace("_", "-"),
            backbone=_cfg,
            attention_strides=(16, 64),
            licence="BSD-3-Clause (architecture)",
            training_data="none",
            recipe="",
            description=f"{_desc} + heads; architecture only, no released pathology weights",
        ),
        config=_cfg,
        decoder_widths={16: 192, 8: 128, 4: 64, 2: 32, 1: 16},
    )(_build_atlas)

for _patch in (16, 8):
    register_model(
        ModelCard(
            name=f"pluto-s{_patch}",
            backbone=f"flexivit_small_p{_patch}",
            mpp=0.5,
            tile_size=512,
            halo=64,
            input_multiple=64,
            tasks=("nuclei", "tiles"),
            nucleus_types=CONSEP_TYPES,
            nucleus_colors=CONSEP_COLORS,
            tissue_classes=KATHER_CLASSES,
            tissue_colors=KATHER_COLORS,
            class_cell_px=64,
            licence="BSD-3-Clause (architecture)",
            training_data="none",
            description=f"PLUTO-style FlexiViT-S at patch {_patch} + CellViT-style decoder; "
            "PLUTO weights "
            "are not public, so this is the architecture only",
        ),
        patch=_patch,
    )(_build_pluto)

register_foundation_model(
    "uni",
    "vit_large_patch16_224",
    hf_hub_id="MahmoodLab/UNI",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    licence="CC BY-NC-ND 4.0 (UNI)",
    timm_kwargs={"init_values": 1e-5},
)
register_foundation_model(
    "virchow",
    "vit_huge_patch14_224",
    hf_hub_id="paige-ai/Virchow",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    licence="Apache-2.0 (Virchow)",
    timm_kwargs={
        "init_values": 1e-5,
        "mlp_layer": "SwiGLUPacked",
        "act_layer": "SiLU",
        "mlp_ratio": 5.3375,
    },
)
register_foundation_model(
    "h-optimus-0",
    "vit_giant_patch14_reg4_dinov2",
    hf_hub_id="bioptimus/H-optimus-0",
    mean=(0.707223, 0.578729, 0.703617),
    std=(0.211883, 0.230117, 0.177517),
    licence="Apache-2.0 (H-optimus-0)",
    timm_kwargs={"init_values": 1e-5},
)
register_foundation_model(
    "phikon-v2",
    "vit_large_patch16_224",
    hf_hub_id=None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    licence="Owkin non-commercial (Phikon-v2)",
    description="Phikon-v2 (ViT-L/16, DINOv2); its hub weights use transformers names: "
    "pass weights=<timm-named .safetensors>; heads need training",
)
