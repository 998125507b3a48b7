"""Labelled pathology data sets, loaded at the model's resolution, with leak-free splits.

Every loader returns :class:`NucleiSample` (or tile images with labels and *groups*) already
resampled to the model's ``mpp`` (um/px): images with anti-aliasing, labels with nearest
neighbour. Splits are by group, never by image: MoNuSeg by patient (first 12 characters of
the TCGA barcode), CoNSeP by source tile, LC25000 by near-duplicate family (dihedral dHash).

Nucleus-type convention in ``types`` maps (int16, same H x W as the image):
``0`` background, ``k >= 1`` nucleus of type ``k - 1`` in :data:`NUCLEUS_TYPES`,
``-1`` nucleus whose type is unknown (MoNuSeg, PanNuke non-neoplastic): the type loss skips it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "KATHER_CLASSES",
    "NUCLEUS_TYPES",
    "NucleiSample",
    "TileSet",
    "consep_group",
    "decode_coco_rle",
    "dihedral_dhash",
    "group_near_duplicates",
    "load_consep",
    "load_kather",
    "load_lc25000",
    "load_monuseg",
    "load_pannuke",
    "mosaic",
    "monuseg_patient",
    "resample_image",
    "resample_labels",
]

#: The default model's nucleus types: the four merged CoNSeP classes, the only source here with
#: a complete type scheme (PanNuke's "neoplastic" maps onto "epithelial").
NUCLEUS_TYPES = ("other", "inflammatory", "epithelial", "spindle-shaped")
#: Native resolutions (um/px) of the 40x sources.
MONUSEG_MPP = 0.25
CONSEP_MPP = 0.25
PANNUKE_MPP = 0.25
KATHER_CLASSES = ("tumour", "stroma", "complex", "lympho", "debris", "mucosa", "adipose", "empty")
LC25000_CLASSES = ("lung_aca", "lung_n", "lung_scc")


@dataclass
class NucleiSample:
    """One labelled image at the model's mpp.

    ``instances`` is int32 (H, W) with 0 = background, or ``None`` when only a binary mask
    exists (HV targets cannot be built: the HV loss is masked). ``foreground`` is bool (H, W).
    ``types`` follows the module convention, or ``None`` when no pixel has a known type.
    ``group`` is the unit of splitting (patient, source tile).
    """

    name: str
    group: str
    source: str
    image: np.ndarray
    instances: np.ndarray | None
    foreground: np.ndarray
    types: np.ndarray | None


@dataclass
class TileSet:
    """Tile images (N, H, W, 3) uint8 with integer labels, class names and split groups."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    classes: tuple[str, ...]
    names: tuple[str, ...]


# ----------------------------------------------------------------------------- resampling


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _read_array(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def resample_image(image: np.ndarray, factor: float) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image by ``factor`` (new px per old px), anti-aliased."""
    if abs(factor - 1.0) < 1e-6:
        return image
    from skimage.transform import rescale

    out = rescale(image, factor, channel_axis=-1, anti_aliasing=factor < 1, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resample_labels(
    labels: np.ndarray, factor: float, shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Resize a label map by ``factor`` with nearest neighbour (labels must never blend)."""
    if abs(factor - 1.0) < 1e-6 and shape is None:
        return labels
    h, w = labels.shape
    if shape is None:
        shape = (max(1, round(h * factor)), max(1, round(w * factor)))
    # Sample source pixel centres: exact nearest neighbour, no dtype round trip through float.
    ys = np.clip(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(int), 0, h - 1)
    xs = np.clip(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(int), 0, w - 1)
    return labels[ys[:, None], xs[None, :]]


# ----------------------------------------------------------------------------- nuclei sets


def monuseg_patient(name: str) -> str:
    """Patient id of a TCGA barcode: its first 12 characters (``TCGA-21-5784``)."""
    return name[:12]


def consep_group(name: str) -> str:
    """Source-tile id of a CoNSeP patch name ``{split}_{tile}_{patch:03d}`` (``train_10``)."""
    m = re.fullmatch(r"(.+)_(\d{3})", Path(name).stem)
    if m is None:
        msg = f"CoNSeP patch name {name!r} does not end in _NNN (expected '{{split}}_{{tile}}_{{patch:03d}}')"
        raise ValueError(msg)
    return m.group(1)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        msg = f"{what} folder {path} does not exist; pass the shared data root (../shared/data)"
        raise FileNotFoundError(msg)
    return path


def load_monuseg(root: Path, *, mpp: float, binary: bool = True) -> list[NucleiSample]:
    """MoNuSeg training tiles resampled from 0.25 um/px to ``mpp``.

    The 13 instance-labelled tiles come first; with ``binary`` the 17 mask-only tiles follow
    (``instances=None``: they train the foreground, not HV).
    """
    root = _require_dir(Path(root) / "monuseg", "MoNuSeg")
    f = MONUSEG_MPP / mpp
    out: list[NucleiSample] = []
    for img_path in sorted((root / "train" / "images").glob("*.tif")):
        inst = _read_array(root / "train" / "labels" / f"{img_path.stem}.png").astype(np.int32)
        image = resample_image(_read_rgb(img_path), f)
        inst = resample_labels(inst, f, image.shape[:2])
        types = np.where(inst > 0, -1, 0).astype(np.int16)
        out.append(
            NucleiSample(
                img_path.stem,
                monuseg_patient(img_path.stem),
                "monuseg",
                image,
                inst,
                inst > 0,
                types,
            )
        )
    if binary:
        extra = root / "train_extra_binary"
        for img_path in sorted((extra / "images").glob("*.tif")):
            mask = _read_array(extra / "binary_masks" / f"{img_path.stem}.png") > 0
            image = resample_image(_read_rgb(img_path), f)
            mask = resample_labels(mask, f, image.shape[:2])
            types = np.where(mask, -1, 0).astype(np.int16)
            out.append(
                NucleiSample(
                    img_path.stem,
                    monuseg_patient(img_path.stem),
                    "monuseg-binary",
                    image,
                    None,
                    mask,
                    types,
                )
            )
    return out


def load_consep(root: Path, *, mpp: float) -> list[NucleiSample]:
    """CoNSeP training patches (256 px at 0.25 um/px) resampled to ``mpp``, grouped by source tile.

    Instance ids are source-tile ids in the files; they are kept (unique within a patch).
    """
    root = _require_dir(Path(root) / "consep", "CoNSeP")
    f = CONSEP_MPP / mpp
    out: list[NucleiSample] = []
    for img_path in sorted((root / "images" / "train").glob("*.jpg")):
        inst = _read_array(root / "inst" / "train" / f"{img_path.stem}.png").astype(np.int32)
        tmap = _read_array(root / "type_map" / "train" / f"{img_path.stem}.png").astype(np.int16)
        image = resample_image(_read_rgb(img_path), f)
        inst = resample_labels(inst, f, image.shape[:2])
        tmap = resample_labels(tmap, f, image.shape[:2])
        # CoNSeP types 1..4 already follow NUCLEUS_TYPES order (+1); keep them aligned with inst.
        tmap = np.where(inst > 0, tmap, 0).astype(np.int16)
        out.append(
            NucleiSample(
                img_path.stem, consep_group(img_path.stem), "consep", image, inst, inst > 0, tmap
            )
        )
    return out


def decode_coco_rle(segmentation: dict) -> np.ndarray:
    """Decode a COCO RLE (``{"size": [h, w], "counts": [...] }``, uncompressed) to a bool mask.

    COCO runs alternate background/foreground starting with background and run down the
    columns (Fortran order).
    """
    h, w = (int(v) for v in segmentation["size"])
    counts = segmentation["counts"]
    if isinstance(counts, str):
        msg = "compressed (string) COCO RLE is not supported; convert it with pycocotools first"
        raise ValueError(msg)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != h * w:
        msg = f"COCO RLE counts sum to {counts.sum()}, expected h*w = {h * w}"
        raise ValueError(msg)
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T


def load_pannuke(root: Path, *, mpp: float) -> list[NucleiSample]:
    """The 25 PanNuke breast patches; neoplastic nuclei -> "epithelial", others type-unknown.

    PanNuke's neoplastic class is malignant epithelium, which CoNSeP files under epithelial;
    "non-neoplastic" mixes inflammatory, connective and normal epithelial cells, so it only
    teaches the foreground and HV, not the type.
    """
    root = _require_dir(Path(root) / "pannuke_breast25", "PanNuke")
    coco = json.loads((root / "json_annotation_demo.json").read_text())
    epithelial = NUCLEUS_TYPES.index("epithelial") + 1
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    f = PANNUKE_MPP / mpp
    out: list[NucleiSample] = []
    for info in sorted(coco["images"], key=lambda d: d["file_name"]):
        img = _read_rgb(root / "images" / info["file_name"])
        inst = np.zeros(img.shape[:2], np.int32)
        types = np.zeros(img.shape[:2], np.int16)
        for k, ann in enumerate(by_image.get(info["id"], []), start=1):
            m = decode_coco_rle(ann["segmentation"])
            inst[m] = k
            types[m] = epithelial if ann["category_id"] == 1 else -1
        image = resample_image(img, f)
        inst = resample_labels(inst, f, image.shape[:2])
        types = resample_labels(types, f, image.shape[:2])
        name = Path(info["file_name"]).stem
        out.append(NucleiSample(name, f"pannuke-{name}", "pannuke", image, inst, inst > 0, types))
    return out


def mosaic(samples: Sequence[NucleiSample], *, name: str | None = None) -> NucleiSample:
    """Tile four equally sized samples 2 x 2 into one (row-major order), relabelling instances.

    Used to make >= 256 px training crops from 128 px patches at 0.5 um/px; instance ids are
    offset per quadrant so a nucleus cut by two patches never becomes one disjoint instance.
    """
    if len(samples) != 4:
        msg = f"mosaic needs exactly 4 samples, got {len(samples)}"
        raise ValueError(msg)
    shapes = {s.image.shape for s in samples}
    if len(shapes) != 1:
        msg = f"mosaic needs equally sized samples, got shapes {sorted(shapes)}"
        raise ValueError(msg)
    rows_img, rows_inst, rows_fg, rows_t = [], [], [], []
    offset = 0
    has_inst = all(s.instances is not None for s in samples)
    for r in range(2):
        ims, ins, fgs, ts = [], [], [], []
        for c in range(2):
            s = samples[2 * r + c]
            ims.append(s.image)
            fgs.append(s.foreground)
            ts.append(
                s.types if s.types is not None else np.where(s.foreground, -1, 0).astype(np.int16)
            )
            if has_inst:
                inst = s.instances.astype(np.int64)
                ins.append(np.where(inst > 0, inst + offset, 0))
                offset += int(inst.max()) + 1
        rows_img.append(np.concatenate(ims, 1))
        rows_fg.append(np.concatenate(fgs, 1))
        rows_t.append(np.concatenate(ts, 1))
        if has_inst:
            rows_inst.append(np.concatenate(ins, 1))
    instances = None
    if has_inst:
        from skimage.segmentation import relabel_sequential

        instances = relabel_sequential(np.concatenate(rows_inst, 0))[0].astype(np.int32)
    return NucleiSample(
        name or "+".join(s.name for s in samples),
        samples[0].group,
        samples[0].source,
        np.concatenate(rows_img, 0),
        instances,
        np.concatenate(rows_fg, 0),
        np.concatenate(rows_t, 0),
    )


# ----------------------------------------------------------------------------- tile sets


def load_kather(root: Path) -> TileSet:
    """The 100-tile Kather 2016 sample (224 px, label in the file name); each tile is its own group."""
    root = _require_dir(Path(root) / "kather2016_sample" / "test_images", "Kather 2016")
    paths = sorted(root.glob("image_*_label_*.png"), key=lambda p: int(p.stem.split("_")[1]))
    labels = np.array([int(p.stem.rsplit("_", 1)[1]) for p in paths])
    images = np.stack([_read_rgb(p) for p in paths])
    names = tuple(p.stem for p in paths)
    # The sample is 100 distinct tiles of one source collection; no duplicate families known,
    # but the dHash grouping is cheap insurance against hidden duplicates.
    groups = group_near_duplicates(images)
    return TileSet(images, labels, groups, KATHER_CLASSES, names)


def load_lc25000(root: Path) -> TileSet:
    """LC25000 lung (3 x 1000 tiles, 224 px) with near-duplicate families as groups.

    Families: dihedral dHash OR central colour histograms within :data:`LC25000_COLOUR_L1`
    (same class). LC25000 rotated its 250 originals per class by arbitrary angles, so the
    dHash alone finds only exact-dihedral copies (about 300 of 3000 tiles).
    """
    root = _require_dir(Path(root) / "lc25000_lung", "LC25000")
    images, labels, names = [], [], []
    for k, cls in enumerate(LC25000_CLASSES):
        for p in sorted((root / cls).glob("*.jpeg")):
            images.append(_read_rgb(p))
            labels.append(k)
            names.append(f"{cls}/{p.name}")
    arr = np.stack(images)
    lab = np.array(labels)
    groups = group_near_duplicates(arr, colour_l1=LC25000_COLOUR_L1, labels=lab)
    return TileSet(arr, lab, groups, LC25000_CLASSES, tuple(names))


def dihedral_dhash(image: np.ndarray, *, size: int = 8) -> int:
    """A ``size**2``-bit difference hash invariant to flips and 90-degree rotations (min over the 8).

    LC25000 tiles were made from 250 originals per class by rotating and flipping; the
    minimum hash over the dihedral group maps such copies to the same (or a close) code.
    """
    from skimage.transform import resize

    grey = image.astype(np.float32).mean(-1) if image.ndim == 3 else image.astype(np.float32)
    # Square, then (size+1) x (size+1) so the comparison is symmetric under all 8 transforms.
    small = resize(grey, (size + 1, size + 1), anti_aliasing=True, preserve_range=True)
    codes = []
    for k in range(4):
        for flip in (False, True):
            g = np.rot90(small, k)
            g = g[:, ::-1] if flip else g
            bits = (g[:-1, 1:] > g[:-1, :-1]).ravel()
            codes.append(int.from_bytes(np.packbits(bits).tobytes(), "big"))
    return min(codes)


def colour_histogram(
    image: np.ndarray, *, bins: int = 8, radius_fraction: float = 0.36
) -> np.ndarray:
    """Normalised RGB histogram (``bins**3``) of the central disc of a tile.

    Invariant to any rotation about the centre and to flips, and robust to the small zooms and
    arbitrary-angle rotations LC25000's augmentation used, which a dHash does not survive.
    """
    h, w = image.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    disc = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) < radius_fraction * min(h, w)
    q = (image[disc].astype(np.int64) * bins) // 256
    hist = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins**3).astype(
        np.float32
    )
    return hist / hist.sum()


def group_near_duplicates(
    images: np.ndarray,
    *,
    max_distance: int = 6,
    colour_l1: float | None = None,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Group ids (int, 0..G-1) joining near-duplicate tiles (connected components).

    Two tiles are joined when their dihedral dHashes differ in <= ``max_distance`` bits, or,
    with ``colour_l1``, when their central colour histograms are within that L1 distance (and,
    with ``labels``, they share a label). Over-joining only makes grouped CV more pessimistic;
    under-joining leaks, so the colour test is the safer choice for augmented sets like LC25000.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(images)
    codes = np.array([dihedral_dhash(im) for im in images], dtype=np.uint64)  # size 8: 64 bits
    rows, cols = [], []
    for i in range(n - 1):
        x = np.bitwise_xor(codes[i], codes[i + 1 :])
        dist = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(1)
        j = np.nonzero(dist <= max_distance)[0] + i + 1
        rows += [i] * len(j)
        cols += j.tolist()
    if colour_l1 is not None:
        hists = np.stack([colour_histogram(im) for im in images])
        # Compare only within a label (3x less work on LC25000; families never cross classes).
        subsets = (
            [np.nonzero(labels == v)[0] for v in np.unique(labels)]
            if labels is not None
            else [np.arange(n)]
        )
        for idx in subsets:
            hs = hists[idx]
            for a in range(0, len(idx), 64):  # chunks keep the (64, m, bins^3) array small
                d = np.abs(hs[a : a + 64, None] - hs[None]).sum(-1)
                ii, jj = np.nonzero(d <= colour_l1)
                ii = ii + a
                keep = jj > ii
                rows += idx[ii[keep]].tolist()
                cols += idx[jj[keep]].tolist()
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


#: L1 distance of central colour histograms under which LC25000 tiles count as one family.
LC25000_COLOUR_L1 = 0.12
