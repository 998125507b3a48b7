"""Reading pixels from one pyramid level (``histolens.slide._read``): level boxes padded
with glass, and analysis-pixel boxes resampled independently of the window they are read in."""

from __future__ import annotations

import numpy as np

from histolens.region import Region
from histolens.slide._read import read_analysis_box


def test_read_exact_level_pads_outside_with_glass():
    level = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    out = read_analysis_box(level, Region(-2, 25, 5, 33), 1.0)
    assert out.shape == (7, 8, 3)
    np.testing.assert_array_equal(out[2:, :5], level[0:5, 25:30])
    assert (out[:2] == 255).all() and (out[:, 5:] == 255).all()


def test_read_resampled_is_independent_of_the_window():
    """A pixel's value depends on its global position only: tiles stitch seamlessly."""
    rng = np.random.default_rng(1)
    level = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    step = 2.2026  # e.g. a 0.227 um/px slide analysed at 0.5 um/px
    whole = read_analysis_box(level, Region(0, 0, 120, 120), step)
    part = read_analysis_box(level, Region(40, 57, 100, 110), step)
    np.testing.assert_array_equal(whole[40:100, 57:110], part)


def test_read_downsampling_is_anti_aliased():
    """A 1-px checkerboard read 4x coarser is flat grey (no aliasing moire)."""
    yy, xx = np.mgrid[0:256, 0:256]
    board = (((yy + xx) % 2) * 255).astype(np.uint8)
    level = np.repeat(board[..., None], 3, axis=2)
    out = read_analysis_box(level, Region(4, 4, 60, 60), 4.0 + 1e-3)
    assert abs(out.mean() - 127.5) < 3 and out.std() < 4


def test_read_upsampling_keeps_geometry():
    """Upsampling by 2: a bright level pixel k maps to analysis pixels 2k and 2k+1."""
    level = np.zeros((10, 10, 3), np.uint8)
    level[4, 6] = 255
    out = read_analysis_box(level, Region(0, 0, 20, 20), 0.5)[..., 0]
    peak = np.unravel_index(np.argmax(out), out.shape)
    assert peak[0] in (8, 9) and peak[1] in (12, 13)
