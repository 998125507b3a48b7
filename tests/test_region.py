"""Region maths, level choice and the one alignment rule (pure, no napari)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from histolens.region import Region, choose_level, layer_transform, visible_region


def test_region_validates_and_clips():
    r = Region(10, 20, 110, 220)
    assert r.shape == (100, 200) and r.area == 20000 and not r.is_empty
    assert r.clip((50, 100)) == Region(10, 20, 50, 100)
    assert Region(-5, -5, 10, 10).clip((100, 100)) == Region(0, 0, 10, 10)
    assert Region(200, 200, 300, 300).clip((100, 100)).is_empty
    with pytest.raises(ValueError, match="far corner"):
        Region(10, 10, 5, 20)
    with pytest.raises(ValueError, match="whole number"):
        Region(0.5, 0, 10, 10)
    assert Region.from_string("1, 2,3,4") == Region(1, 2, 3, 4)
    with pytest.raises(ValueError, match="y0,x0,y1,x1"):
        Region.from_string("1,2,3")


def test_region_at_downsample_covers_the_box():
    r = Region(3, 5, 17, 30)
    y0, x0, y1, x1 = r.at_downsample(4)
    assert (y0 * 4 <= 3 and x0 * 4 <= 5) and (y1 * 4 >= 17 and x1 * 4 >= 30)
    assert (y0, x0, y1, x1) == (0, 1, 5, 8)


@pytest.mark.parametrize(
    ("mpp", "downsamples", "target", "level", "resample"),
    [
        (0.25, (1, 2, 4, 8), 0.5, 1, 1.0),  # exact level
        (0.25, (1, 4, 16), 0.5, 0, 0.5),  # no 0.5 level: read the finer one, downsample 2x
        (0.499, (1, 2, 4), 0.5, 0, 0.998),  # within 2 % counts as a match
        (1.0, (1, 2), 0.5, 0, 2.0),  # slide coarser than the model: upsample
    ],
)
def test_choose_level(mpp, downsamples, target, level, resample):
    choice = choose_level(mpp, downsamples, target)
    assert choice.level == level
    assert choice.resample == pytest.approx(resample, rel=1e-3)


def test_choose_level_refuses_missing_mpp():
    with pytest.raises(ValueError, match="mpp"):
        choose_level(None, (1, 2), 0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("f", [1, 2, 4, 8, 16, 2.5])
def test_layer_transform_puts_output_pixels_on_their_level0_pixels(f):
    """Output pixel k covers level-0 [y0 + k f, y0 + (k+1) f): its centre must land there."""
    mpp, y0, x0 = 0.499, 1000, 37
    scale, translate = layer_transform(mpp, f, (y0, x0))
    for k in (0, 1, 7):
        world_y = translate[0] + scale[0] * k
        # the slide layer (scale=mpp) has the centre of level-0 pixel j at j*mpp, so
        # level-0 continuous coordinate of that point:
        level0 = world_y / mpp
        assert level0 == pytest.approx(y0 + k * f + (f - 1) / 2)
        # the output pixel's extent in level-0 pixel edges: [centre - f/2 + 0.5, ...)
        first_edge = level0 - f / 2 + 0.5
        assert first_edge == pytest.approx(y0 + k * f)


def test_visible_region_matches_canvas_extent():
    # canvas 900 x 1600 screen px at zoom 4 (screen px per um), slide at 0.25 um/px:
    # 225 x 400 um on screen = 900 x 1600 level-0 px (+1 for partly visible pixels)
    mpp = 0.25
    center = (5000 * mpp, 8000 * mpp)
    r = visible_region(center, 4.0, (900, 1600), layer_scale=(mpp, mpp))
    assert r.height == 901 and r.width == 1601
    assert abs((r.y0 + r.y1) / 2 - 5000) <= 1 and abs((r.x0 + r.x1) / 2 - 8000) <= 1


def test_visible_region_clips_to_the_slide():
    r = visible_region(
        (0.0, 0.0), 0.01, (800, 800), layer_scale=(0.5, 0.5), level0_shape=(3000, 2000)
    )
    assert r == Region(0, 0, 3000, 2000)
    assert math.isclose(np.prod(r.shape), 6e6)
