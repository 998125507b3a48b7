"""Training targets (foreground, HoVer horizontal/vertical maps, types) and pathology augmentation.

All arrays are at the model's mpp. Geometry (scale jitter, crop, flips, 90-degree rotations)
is applied to the *labels* before the HV targets are computed, so HV never needs re-signing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .datasets import NucleiSample, resample_labels

__all__ = [
    "AugmentConfig",
    "Example",
    "hv_targets",
    "make_example",
]


def hv_targets(instances: np.ndarray) -> np.ndarray:
    """HoVer-Net horizontal/vertical distance maps of an instance map, float32 (2, H, W).

    Channel 0 = x, 1 = y offsets from each nucleus's rounded centre of mass, each side scaled
    to [-1, 0] / [0, 1]; background 0. Delegates to the post-processing module so the targets
    and the watershed that reads them share one convention.
    """
    from histolens.models.postprocess import instances_to_hv

    return instances_to_hv(instances)


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths; ``scale`` is the zoom range around the model's mpp."""

    size: int = 256
    scale: tuple[float, float] = (0.8, 1.25)
    hed_sigma: float = 0.05
    hed_bias: float = 0.02
    brightness: float = 0.1
    contrast: float = 0.15
    pad_value: int = 240

    def __post_init__(self) -> None:
        for name in ("hed_sigma", "hed_bias"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                msg = f"{name} {v}: stain jitter must be in [0, 1) (default {getattr(AugmentConfig, name)})"
                raise ValueError(msg)


@dataclass
class Example:
    """One training example: ``image`` uint8 (H, W, 3), ``foreground`` float32 (H, W),
    ``hv`` float32 (2, H, W), ``hv_valid`` (False for binary-mask sources),
    ``types`` int64 (H, W) with 0 background, k = type k-1 + 1, -1 unknown (ignored)."""

    image: np.ndarray
    foreground: np.ndarray
    hv: np.ndarray
    hv_valid: bool
    types: np.ndarray


def hed_jitter(
    image: np.ndarray, rng: np.random.Generator, *, sigma: float, bias: float
) -> np.ndarray:
    """Stain augmentation in haematoxylin-eosin-DAB space: ``hed * a + b`` per channel.

    Perturbing optical densities (not RGB) mimics lab-to-lab staining variation.
    """
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(image)
    a = rng.uniform(1 - sigma, 1 + sigma, size=3)
    b = rng.uniform(-bias, bias, size=3)
    out = hed2rgb(hed * a + b)
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _brightness_contrast(
    image: np.ndarray, rng: np.random.Generator, *, brightness: float, contrast: float
) -> np.ndarray:
    x = image.astype(np.float32)
    c = rng.uniform(1 - contrast, 1 + contrast)
    b = rng.uniform(-brightness, brightness) * 255.0
    mean = x.mean()
    return np.clip((x - mean) * c + mean + b, 0, 255).astype(np.uint8)


def _pad_to(arr: np.ndarray, h: int, w: int, value: int) -> np.ndarray:
    ph, pw = max(0, h - arr.shape[0]), max(0, w - arr.shape[1])
    if ph == 0 and pw == 0:
        return arr
    pad = [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)] + [(0, 0)] * (arr.ndim - 2)
    return np.pad(arr, pad, constant_values=value)


def make_example(
    sample: NucleiSample,
    rng: np.random.Generator,
    cfg: AugmentConfig = AugmentConfig(),
    *,
    augment: bool = True,
) -> Example:
    """A random ``cfg.size`` crop of ``sample`` with geometry and colour augmentation and targets.

    Scale jitter: a crop of ``size / s`` px is resized to ``size`` (zoom ``s`` drawn
    log-uniformly from ``cfg.scale``), i.e. the apparent mpp varies by that factor.
    """
    from skimage.transform import resize

    size = cfg.size
    s = float(np.exp(rng.uniform(*np.log(cfg.scale)))) if augment else 1.0
    crop = max(8, round(size / s))
    types = (
        sample.types
        if sample.types is not None
        else np.where(sample.foreground, -1, 0).astype(np.int16)
    )
    inst = sample.instances
    image = _pad_to(sample.image, crop, crop, cfg.pad_value)
    fg = _pad_to(sample.foreground, crop, crop, 0)
    types = _pad_to(types, crop, crop, 0)
    inst = _pad_to(inst, crop, crop, 0) if inst is not None else None
    y0 = int(rng.integers(0, image.shape[0] - crop + 1))
    x0 = int(rng.integers(0, image.shape[1] - crop + 1))
    win = (slice(y0, y0 + crop), slice(x0, x0 + crop))
    image, fg, types = image[win], fg[win], types[win]
    inst = inst[win] if inst is not None else None
    if crop != size:
        image = np.clip(
            resize(image, (size, size), order=1, preserve_range=True, anti_aliasing=crop > size)
            + 0.5,
            0,
            255,
        ).astype(np.uint8)
        fg = resample_labels(fg, 1.0, (size, size))
        types = resample_labels(types, 1.0, (size, size))
        inst = resample_labels(inst, 1.0, (size, size)) if inst is not None else None
    if augment:
        k, flip = int(rng.integers(4)), bool(rng.integers(2))

        def geo(a: np.ndarray) -> np.ndarray:
            a = np.rot90(a, k, axes=(0, 1))
            return np.ascontiguousarray(a[:, ::-1] if flip else a)

        image, fg, types = geo(image), geo(fg), geo(types)
        inst = geo(inst) if inst is not None else None
        image = hed_jitter(image, rng, sigma=cfg.hed_sigma, bias=cfg.hed_bias)
        image = _brightness_contrast(image, rng, brightness=cfg.brightness, contrast=cfg.contrast)
    hv = hv_targets(inst) if inst is not None else np.zeros((2, size, size), np.float32)
    return Example(
        image=np.ascontiguousarray(image),
        foreground=fg.astype(np.float32),
        hv=hv,
        hv_valid=inst is not None,
        types=types.astype(np.int64),
    )
