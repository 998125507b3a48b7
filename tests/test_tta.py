"""Test-time augmentation: the 8 dihedral views are undone exactly, HV vectors included."""

from __future__ import annotations

import numpy as np
import pytest

from histolens.models import create_model
from histolens.models.tta import DIHEDRAL_VIEWS, TestTimeAugmented, apply_view, undo_view


class CentreModel:
    """An exactly equivariant fake: nucleus probability = red channel, HV = offset from centre.

    ``bias`` adds a constant to the horizontal map, which no rotation-invariant model would
    do: averaging the views must cancel it.
    """

    def __init__(self, bias: float = 0.0) -> None:
        self.card = create_model("test-tiny", pretrained=False).card
        self.bias = bias
        self.calls = 0

    def predict_tiles(self, tiles, *, tasks=("nuclei",), precision="auto"):
        self.calls += 1
        b, h, w, _ = tiles.shape
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        hv = np.stack([(x - (w - 1) / 2) / w + self.bias, (y - (h - 1) / 2) / h])
        prob = tiles[..., 0].astype(np.float32) / 255
        types = np.stack([prob, 1 - prob], axis=1)
        return {
            "nuclei_prob": prob,
            "hv": np.repeat(hv[None], b, 0),
            "type_prob": types,
            "tile_probs": np.ones((b, 1, 1, 3)),
        }


@pytest.fixture
def tiles() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(2, 48, 64, 3), dtype=np.uint8)  # not square on purpose


@pytest.mark.parametrize("view", DIHEDRAL_VIEWS)
def test_each_view_is_undone(tiles: np.ndarray, view: tuple[bool, bool, bool]) -> None:
    model = CentreModel()
    plain = model.predict_tiles(tiles)
    seen = model.predict_tiles(apply_view(tiles, view))
    np.testing.assert_array_equal(undo_view(seen["nuclei_prob"], view), plain["nuclei_prob"])
    np.testing.assert_array_equal(undo_view(seen["type_prob"], view), plain["type_prob"])
    np.testing.assert_allclose(undo_view(seen["hv"], view, hv=True), plain["hv"], atol=1e-6)


def test_an_equivariant_model_is_unchanged_and_a_biased_one_is_averaged() -> None:
    square = np.random.default_rng(1).integers(0, 256, size=(1, 40, 40, 3), dtype=np.uint8)
    model = CentreModel()
    tta = TestTimeAugmented(model)
    out = tta.predict_tiles(square, tasks=("nuclei", "tiles"))
    ref = model.predict_tiles(square)
    assert model.calls == 1 + len(DIHEDRAL_VIEWS)
    np.testing.assert_allclose(out["nuclei_prob"], ref["nuclei_prob"], atol=1e-6)
    np.testing.assert_allclose(out["hv"], ref["hv"], atol=1e-6)
    assert out["tile_probs"].shape == ref["tile_probs"].shape  # identity view, untouched
    # A constant horizontal bias points left as often as right over the 8 views.
    biased = TestTimeAugmented(CentreModel(bias=0.5)).predict_tiles(square)
    np.testing.assert_allclose(biased["hv"], ref["hv"], atol=1e-6)


def test_wrapper_has_its_own_cache_name_and_runs_in_the_engine() -> None:
    from histolens.nuclei import segment_nuclei

    model = create_model("test-tiny", pretrained=False)
    tta = TestTimeAugmented(model)
    assert tta.card.name == "test-tiny+tta" and tta.card.mpp == model.card.mpp
    # Through the engine, every model input is seen in all 8 views; an equivariant model's
    # nuclei come out exactly as without TTA.
    yy, xx = np.mgrid[0:96, 0:80]
    disks = ((yy - 40) ** 2 + (xx - 30) ** 2 < 100) | ((yy - 70) ** 2 + (xx - 60) ** 2 < 64)
    image = np.where(disks[..., None], 255, 30).astype(np.uint8).repeat(3, axis=-1)
    plain_model, tta_model = CentreModel(), CentreModel()
    plain, _ = segment_nuclei(image, mpp=0.5, model=plain_model)
    averaged, table = segment_nuclei(image, mpp=0.5, model=tta_model, tta=True)
    assert tta_model.calls == len(DIHEDRAL_VIEWS) * plain_model.calls > 0
    assert plain.max() >= 2
    np.testing.assert_array_equal(averaged, plain)
    assert set(table["label"]) == set(np.unique(averaged)) - {0}
