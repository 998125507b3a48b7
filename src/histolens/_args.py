"""argparse ``type=`` checks shared by the sub-commands: a bad value is one clear line."""

from __future__ import annotations

import argparse
import math

__all__ = ["mpp_value", "non_negative_int", "positive_int"]

#: Micrometres per pixel a microscope image can have (a 100x objective ~0.06, a slide
#: overview ~20): values outside are typos or unit mix-ups (nm, mm), not images.
MPP_RANGE = (1e-3, 1e3)


def positive_float(text: str) -> float:
    """A finite number > 0 (an mpp, a size): ``inf``, ``nan``, 0 and negatives are refused."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        msg = f"must be a positive finite number, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def mpp_value(text: str) -> float:
    """Micrometres per pixel: a finite number within :data:`MPP_RANGE`."""
    value = positive_float(text)
    lo, hi = MPP_RANGE
    if not lo <= value <= hi:
        msg = (
            f"{text} um/px is not a microscope pixel size (expected {lo:g} to {hi:g}; "
            "0.25 at 40x, 0.5 at 20x)"
        )
        raise argparse.ArgumentTypeError(msg)
    return value


def _int(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        msg = f"must be an integer >= {least}, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (threads, block sizes, batch sizes)."""
    return _int(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (``--workers``: 0 runs in this process)."""
    return _int(text, 0)
