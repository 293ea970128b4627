"""Shared drawing helpers of SynthAD: the pixel grid, rotations, soft coverage, noise, colours."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from zsad.data.synth.catalogue import COLORS, FloatArray


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[FloatArray, FloatArray]:
    """Pixel-centre coordinates in frame units (read-only: the cache hands out the same arrays)."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(t, t, indexing="ij")
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@dataclass(frozen=True)
class _Canvas:
    size: int
    x: FloatArray
    y: FloatArray
    light: tuple[float, float]  # unit vector in the image plane pointing towards the light


def _rotate(
    x: FloatArray, y: FloatArray, cx: float, cy: float, theta: float
) -> tuple[FloatArray, FloatArray]:
    """Coordinates relative to (cx, cy) in a frame turned by ``theta``."""
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    dx, dy = x - np.float32(cx), y - np.float32(cy)
    return dx * c + dy * s, dy * c - dx * s


def _coverage(sdf: FloatArray, size: int, soft_px: float = 1.0) -> FloatArray:
    """Anti-aliased coverage of the region ``sdf < 0`` (sdf in frame units) over a ramp of ``soft_px``."""
    return np.clip(0.5 - sdf * (size / soft_px), 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, size: int, res: int) -> FloatArray:
    """Value noise in ~[0, 1]: a random ``res x res`` grid upsampled bicubically (PIL float image)."""
    grid = rng.random((res, res), dtype=np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))


def _noise_1d(rng: np.random.Generator, t: FloatArray, step: float) -> FloatArray:
    """Piecewise-linear 1-D noise in [0, 1] along coordinate ``t`` with knots every ``step`` frame units."""
    lo, hi = float(t.min()), float(t.max())
    knots = np.arange(lo - step, hi + 2 * step, step, dtype=np.float32)
    values = rng.random(knots.size, dtype=np.float32)
    return np.interp(t, knots, values).astype(np.float32)


def _mix(a, b, w: FloatArray) -> FloatArray:
    """``a (1 - w) + b w`` with colours (3,) or images (S, S, 3) and a weight map (S, S)."""
    w = w[..., None]
    return (a * (1.0 - w) + b * w).astype(np.float32)


def _luma(rgb) -> FloatArray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _pick_color(
    rng: np.random.Generator, names: Sequence[str], avoid=None, min_dist: float = 0.0
) -> tuple[str, FloatArray]:
    """A named colour (jittered) from ``names`` whose mean absolute channel difference from ``avoid`` is at
    least ``min_dist`` (the measure :data:`MIN_MEAN_CHANGE` uses, on a 0..1 scale)."""
    pool = [n for n in names if avoid is None or np.abs(np.subtract(COLORS[n], avoid)).mean() >= min_dist]
    name = pool[rng.integers(len(pool))] if pool else names[rng.integers(len(names))]
    rgb = np.asarray(COLORS[name], np.float32) + rng.normal(0.0, 0.035, 3).astype(np.float32)
    return name, np.clip(rgb, 0.0, 1.0)


def _second_color(rng: np.random.Generator, name: str, rgb: FloatArray, names: Sequence[str]) -> FloatArray:
    """A pattern's second colour: another palette colour, or a lighter/darker shade of the first."""
    if rng.random() < 0.5:
        return _pick_color(rng, [n for n in names if n != name], avoid=rgb, min_dist=0.18)[1]
    if _luma(rgb) > 0.45:
        return (rgb * rng.uniform(0.4, 0.65)).astype(np.float32)
    return (rgb + (1.0 - rgb) * rng.uniform(0.35, 0.6)).astype(np.float32)


def _bevel(sdf: FloatArray, width: float, cv: _Canvas) -> FloatArray:
    """Lambert-like term in ~[-1, 1] for a surface that rises over ``width`` from the shape's edge.

    The height ``clip(-sdf / width, 0, 1)`` has slope ``1 / width``; its finite-difference gradient dotted
    with the light direction makes edges facing the light bright and the far edges dark.
    """
    h = np.clip(-sdf / width, 0.0, 1.0)
    gy, gx = np.gradient(h)
    return -(gx * cv.light[0] + gy * cv.light[1]) * (width * cv.size)


def _placement(rng: np.random.Generator) -> tuple[float, float, float]:
    cx, cy = 0.5 + rng.uniform(-0.06, 0.06, 2)
    return float(cx), float(cy), float(rng.uniform(0.0, 2 * np.pi))
