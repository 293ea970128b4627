"""SynthAD: the procedural defect world that zsad-tiny is trained on and every offline test runs on.

design.md, "The embedded default world": no pretrained CLIP weights exist here, so the project renders its own
anomaly-detection dataset. Every image is a pure function of a seed, vectorised numpy with PIL only for lines.

How an image is made (:func:`draw_scene`, then optionally :func:`apply_defect`):

* a *scene* holds the surface colour ``base`` (texture painters fill the frame; object painters draw a shaded
  object from a signed distance function over a background with a soft shadow), a multiplicative ``light``
  field (gain, directional gradient, vignette) and additive sensor ``noise``;
* the image is ``quantise(base * light + noise)``;
* a defect only rewrites ``base`` inside its own region (``base' = base + alpha (target - base)``, clipped to
  the object), then the same light and noise are applied. Pixels outside the region are therefore
  byte-identical to the clean image, and the ground-truth mask is *defined* as the set of pixels whose
  bytes changed: it is exact by construction, and a test can check it.

Geometry is in frame units (the image is the unit square), so ``size`` can be anything; defect sizes are
multiples of the scene's characteristic radius (half the frame for textures, the object's radius for
objects), because in the throwaway prototype defects sized in pixels were too small on objects. Line widths
scale with ``size`` but never drop below 2 px. A defect attempt whose change is too faint
(:data:`MIN_MEAN_CHANGE`) or too small is redrawn. Normal images vary in colour, orientation, pattern scale,
lighting and noise, so "normal vs defective" cannot be told apart by global colour.

Seeds: :func:`generate` draws image ``i`` of (category, split, defect) from
``np.random.default_rng([seed, CATEGORIES.index(category), split, defect_index, i])``, so a subset of
categories renders the same images for the categories it keeps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SYNTH_VERSION = 1
"""Bump whenever a change alters any rendered byte, so :func:`ensure` regenerates stale trees."""

TEXTURES: tuple[str, ...] = ("carpet", "tile", "grid", "fabric", "wood", "marble", "leather", "wallpaper")
OBJECTS: tuple[str, ...] = ("nut", "washer", "gear", "screw", "capsule", "pill", "bottle")
CATEGORIES: tuple[str, ...] = TEXTURES + OBJECTS
# Prompts use the category key as the class name (prompts.py), so keys are already the caption phrase.
CATEGORY_PHRASES: dict[str, str] = {c: c for c in CATEGORIES}
DEFECTS: tuple[str, ...] = ("scratch", "hole", "stain", "crack", "missing", "color")

MIN_MEAN_CHANGE = 30.0
"""Least mean absolute change (0..255, over the mask's pixels and channels) of an accepted defect."""
_MIN_COVERAGE = 0.9  # share of the defect's intended core that must really change (no speckled masks)
_MIN_AREA = 0.0015  # least defect area, as a fraction of the frame
_MAX_TRIES = 12

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.78, 0.16, 0.15),
    "orange": (0.93, 0.52, 0.13),
    "yellow": (0.92, 0.82, 0.22),
    "green": (0.22, 0.58, 0.25),
    "cyan": (0.2, 0.72, 0.78),
    "blue": (0.17, 0.3, 0.76),
    "purple": (0.5, 0.23, 0.62),
    "pink": (0.93, 0.56, 0.7),
    "brown": (0.5, 0.31, 0.16),
    "beige": (0.85, 0.76, 0.6),
    "white": (0.92, 0.92, 0.9),
    "gray": (0.5, 0.5, 0.5),
    "black": (0.13, 0.13, 0.14),
    "silver": (0.72, 0.74, 0.77),
    "gold": (0.83, 0.66, 0.26),
}
_PLAIN = (
    "red",
    "orange",
    "yellow",
    "green",
    "cyan",
    "blue",
    "purple",
    "pink",
    "brown",
    "beige",
    "white",
    "gray",
    "black",
)
_SATURATED = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
_PALETTES: dict[str, tuple[str, ...]] = {
    **{c: _PLAIN for c in TEXTURES},
    "wood": ("brown", "beige", "orange", "red", "gray"),
    "marble": ("white", "gray", "black", "green", "pink", "beige"),
    "leather": ("brown", "black", "red", "beige", "blue", "green", "gray"),
    "nut": ("silver", "gray", "gold", "brown", "black"),
    "washer": ("silver", "gray", "gold", "brown", "black"),
    "gear": ("silver", "gray", "gold", "brown", "black"),
    "screw": ("silver", "gray", "gold", "brown", "black"),
    "capsule": _PLAIN,
    "pill": _PLAIN,
    "bottle": ("brown", "green", "blue", "white", "black", "gray", "cyan"),
}
_BACKGROUNDS = ("white", "gray", "black", "beige", "blue", "green", "brown")

FloatArray = np.ndarray


# ----------------------------------------------------------------------------------------------- helpers
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


# ---------------------------------------------------------------------------------------------- textures
def _paint_carpet(rng: np.random.Generator, cv: _Canvas) -> tuple[FloatArray, str]:
    """Soft stripes with fibre streaks along them."""
    name, c1 = _pick_color(rng, _PALETTES["carpet"])
    c2 = _second_color(rng, name, c1, _PALETTES["carpet"])
    u, v = _rotate(cv.x, cv.y, 0.5, 0.5, rng.uniform(0, np.pi))
    period = rng.uniform(0.05, 0.16)
    wobble = 0.012 * (_smooth_noise(rng, cv.size, 5) - 0.5)
    w = 1.0 / (1.0 + np.exp(-rng.uniform(4, 25) * np.sin(2 * np.pi * (u + wobble) / period)))
    fibres = 0.9 + 0.2 * _noise_1d(rng, u, 1.5 / cv.size)
    return _mix(c1, c2, w.astype(np.float32)) * fibres[..., None], name


def _paint_tile(rng: np.random.Generator, cv: _Canvas) -> tuple[FloatArray, str]:
    """A checkerboard of tiles with grout lines and a slight per-tile shade."""
    name, c1 = _pick_color(rng, _PALETTES["tile"])
    c2 = _second_color(rng, name, c1, _PALETTES["tile"])
    u, v = _rotate(cv.x, cv.y, 0.5, 0.5, rng.uniform(0, np.pi / 2))
    p = rng.uniform(0.08, 0.22)
    iu, iv = np.floor(u / p), np.floor(v / p)
    # Distance to the nearest tile edge, for anti-aliased tiles and grout.
    du = p * (0.5 - np.abs(u / p - iu - 0.5))
    dv = p * (0.5 - np.abs(v / p - iv - 0.5))
    edge = np.minimum(du, dv)
    odd = np.mod(iu + iv, 2) > 0.5
    shade_table = 1.0 + rng.normal(0, 0.04, (16, 16)).astype(np.float32)
    shade = shade_table[np.mod(iu, 16).astype(int), np.mod(iv, 16).astype(int)]
    img = np.where(odd[..., None], c2, c1) * shade[..., None]
    grout_rgb = np.full(3, rng.uniform(0.35, 0.8), np.float32)
    grout = _coverage(edge - rng.uniform(0.002, 0.006), cv.size)
    return _mix(img, grout_rgb, grout), name


def _paint_grid(rng: np.random.Generator, cv: _Canvas) -> tuple[FloatArray, str]:
    """Lines on a plain ground, like a wire grid or graph paper."""
    name, c1 = _pick_color(rng, _PALETTES["grid"])
    c2 = _second_color(rng, name, c1, _PALETTES["grid"])
    u, v = _rotate(cv.x, cv.y, 0.5, 0.5, rng.uniform(0, np.pi / 2))
    p = rng.uniform(0.06, 0.16)
    du = p * (0.5 - np.abs(np.mod(u / p, 1.0) - 0.5))
    dv = p * (0.5 - np.abs(np.mod(v / p, 1.0) - 0.5))
    lines = _coverage(np.minimum(du, dv) - rng.uniform(0.004, 0.01), cv.size)
    ground = c1 * (0.95 + 0.1 * _smooth_noise(rng, cv.size, 6))[..., None]
    return _mix(ground, c2, lines), name


def _paint_fabric(rng: np.random.Generator, cv: _Canvas) -> tuple[FloatArray, str]:
    """Plain weave: warp and weft threads alternate over/under, each shaded across its width."""
    name, c1 = _pick_color(rng, _PALETTES["fabric"])
    c2 = np.clip(c1 * rng.uniform(0.8, 1.2, 3).astype(np.float32), 0, 1)
    u, v = _rotate(cv.x, cv.y, 0.5, 0.5, rng.uniform(0, np.pi / 2))
    p = rng.uniform(0.018, 0.035)
    fu, fv = np.mod(u / p, 1.0), np.mod(v / p, 1.0)
    warp_on_top = np.mod(np.floor(u / p) + np.floor(v / p), 2) > 0.5
    across = np.where(warp_on_top, np.sin(np.pi * fu), np.sin(np.pi * fv))
    thread = 0.72 + 0.28 * across
    img = np.where(warp_on_top[..., None], c1, c2) * thread[..., None]
    slub = 0.92 + 0.16 * _smooth_noise(rng, cv.size, 12)
    return img * slub[..., None], name


def _paint_wood(rng: np.random.Generator, cv: _Canvas) -> tuple[FloatArray, str]:
    """Growth rings around a distant, stretched centre, with fine grain streaks."""
    name, c1 = _pick_color(rng, _PALETTES["wood"])
    c2 = (c1 * rng.uniform(0.45, 0.7)).astype(np.float32)
    ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.6)
    u, v = _rotate(cv.x, cv.y, 0.5 + dist * np.cos(ang), 0.5 + dist * np.sin(ang), rng.uniform(0, np.pi))
    r = np.sqrt((u * rng.uniform(0.25, 1.0)) ** 2 + v**2) + 0.05 * _smooth_noise(rng, cv.size, 6)
    period = rng.uniform(0.03, 0.08)
    rings = (0.5 + 0.5 * np.sin(2 * np.pi * r / period)) ** rng.uniform(1.5, 4.0)
    grain = 0.9 + 0.2 * _noise_1d(rng, r, 1.2 / cv.size)
    return _mix(c1, c2, rings.astype(np.float32)) * grain[..., None], name


def _paint_marble(rng: np.random.Generator, cv: _Canvas) -> tuple[FloatArray, str]:
    """Turbulent veins over a mottled ground."""
    name, c1 = _pick_color(rng, _PALETTES["marble"])
    c2 = _second_color(rng, name, c1, _PALETTES["marble"])
    u, _ = _rotate(cv.x, cv.y, 0.5, 0.5, rng.uniform(0, np.pi))
    turbulence = _smooth_noise(rng, cv.size, 4) + 0.5 * _smooth_noise(rng, cv.size, 9)
    phase = u / rng.uniform(0.08, 0.2) + rng.uniform(3, 7) * turbulence
    veins = np.exp(-np.abs(np.sin(phase)) / rng.uniform(0.08, 0.25))
    ground = c1 * (0.9 + 0.15 * _smooth_noise(rng, cv.size, 7))[..., None]
    return _mix(ground, c2, veins.astype(np.float32)), name


def _paint_leather(rng: np.random.Generator, cv: _Canvas) -> tuple[FloatArray, str]:
    """Pebbled grain: cellular (Worley) noise on a jittered grid, dark grooves where two cells meet."""
    name, c1 = _pick_color(rng, _PALETTES["leather"])
    cell = rng.uniform(0.025, 0.06)
    n = int(np.ceil(1.0 / cell)) + 3
    jitter_x = rng.random((n, n), dtype=np.float32).ravel()
    jitter_y = rng.random((n, n), dtype=np.float32).ravel()
    px, py = cv.x / np.float32(cell), cv.y / np.float32(cell)  # cell units
    gx, gy = np.floor(px), np.floor(py)
    fx, fy = px - gx, py - gy
    home = (gy.astype(np.intp) + 1) * n + gx.astype(np.intp) + 1  # flat index of the pixel's own cell
    # The nearest and second-nearest feature point among the 3 x 3 neighbouring cells, kept incrementally.
    f1 = np.full_like(px, np.inf)
    f2 = np.full_like(px, np.inf)
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            idx = home + (oy * n + ox)
            d2 = (ox + jitter_x.take(idx) - fx) ** 2 + (oy + jitter_y.take(idx) - fy) ** 2
            f2 = np.minimum(f2, np.maximum(f1, d2))
            f1 = np.minimum(f1, d2)
    f = (np.sqrt(f1) * cell, np.sqrt(f2) * cell)
    groove = np.clip((f[1] - f[0]) / (0.25 * cell), 0.0, 1.0)
    dome = 1.0 - 0.25 * (f[0] / cell) ** 2
    shade = (0.65 + 0.35 * groove) * dome * (0.93 + 0.14 * _smooth_noise(rng, cv.size, 5))
    return c1 * shade[..., None].astype(np.float32), name


def _paint_wallpaper(rng: np.random.Generator, cv: _Canvas) -> tuple[FloatArray, str]:
    """Dots on a hexagonal lattice over slightly mottled paper."""
    name, c1 = _pick_color(rng, _PALETTES["wallpaper"])
    c2 = _second_color(rng, name, c1, _PALETTES["wallpaper"])
    u, v = _rotate(cv.x, cv.y, 0.5, 0.5, rng.uniform(0, np.pi / 3))
    p = rng.uniform(0.06, 0.15)
    row_h = p * np.sqrt(3) / 2
    row = np.floor(v / row_h)
    du = np.mod(u + 0.5 * p * np.mod(row, 2), p) - 0.5 * p
    dv = np.mod(v, row_h) - 0.5 * row_h
    dots = _coverage(np.hypot(du, dv) - p * rng.uniform(0.18, 0.32), cv.size)
    paper = c1 * (0.94 + 0.12 * _smooth_noise(rng, cv.size, 10))[..., None]
    return _mix(paper, c2, dots), name


# ----------------------------------------------------------------------------------------------- objects
@dataclass
class _Object:
    rgb: FloatArray  # (S, S, 3) shaded object colour (meaningful where the object covers)
    sdf: FloatArray  # signed distance (frame units) of the object, holes included
    outer: FloatArray  # signed distance of the outline without inner holes
    shape: Callable[[FloatArray, FloatArray], FloatArray]  # sdf at any coordinates (for the shadow)
    scale: float  # characteristic radius, frame units
    center: tuple[float, float]
    color: str


def _metal(rng: np.random.Generator, phi: FloatArray, col: FloatArray) -> FloatArray:
    """Anisotropic metallic sheen: two bright lobes around the centre plus a white specular share."""
    phase = rng.uniform(0, np.pi)
    sheen = 0.5 + 0.5 * np.cos(2 * (phi - phase))
    return col * (0.7 + 0.35 * sheen)[..., None] + (0.18 * sheen**6)[..., None]


def _paint_nut(rng: np.random.Generator, cv: _Canvas) -> _Object:
    name, col = _pick_color(rng, _PALETTES["nut"])
    cx, cy, th = _placement(rng)
    R = rng.uniform(0.27, 0.37)
    ri = R * rng.uniform(0.38, 0.5)
    apothem = R * float(np.cos(np.pi / 6))

    def outline(x: FloatArray, y: FloatArray) -> tuple[FloatArray, FloatArray]:
        u, v = _rotate(x, y, cx, cy, th)
        hexagon = np.maximum.reduce([np.abs(u), np.abs(0.5 * u + 0.866 * v), np.abs(0.5 * u - 0.866 * v)])
        r = np.hypot(u, v)
        outer = np.maximum(hexagon - apothem, r - 0.96 * R)  # chamfered corners
        return np.maximum(outer, ri - r), outer

    sdf, outer = outline(cv.x, cv.y)
    u, v = _rotate(cv.x, cv.y, cx, cy, th)
    r, phi = np.hypot(u, v), np.arctan2(v, u)
    rgb = _metal(rng, phi, col)
    thread = (r < ri + 0.12 * R) * (0.25 + 0.1 * np.sin(2 * np.pi * r / (0.03 * R)))
    rgb = rgb * (1.0 - thread)[..., None] * (1.0 + 0.35 * _bevel(outer, 0.05 * R, cv))[..., None]
    return _Object(rgb, sdf, outer, lambda x, y: outline(x, y)[0], R, (cx, cy), name)


def _paint_washer(rng: np.random.Generator, cv: _Canvas) -> _Object:
    name, col = _pick_color(rng, _PALETTES["washer"])
    cx, cy, _ = _placement(rng)
    R = rng.uniform(0.28, 0.4)
    ri = R * rng.uniform(0.35, 0.55)

    def outline(x: FloatArray, y: FloatArray) -> tuple[FloatArray, FloatArray]:
        r = np.hypot(x - np.float32(cx), y - np.float32(cy))
        outer = r - R
        return np.maximum(outer, ri - r), outer

    sdf, outer = outline(cv.x, cv.y)
    u, v = cv.x - np.float32(cx), cv.y - np.float32(cy)
    r, phi = np.hypot(u, v), np.arctan2(v, u)
    brushed = 0.9 + 0.2 * _noise_1d(rng, r, 1.5 / cv.size)
    rgb = _metal(rng, phi, col) * brushed[..., None]
    rgb = rgb * (1.0 + 0.4 * _bevel(sdf, 0.03 * R, cv))[..., None]
    return _Object(rgb, sdf, outer, lambda x, y: outline(x, y)[0], R, (cx, cy), name)


def _paint_gear(rng: np.random.Generator, cv: _Canvas) -> _Object:
    name, col = _pick_color(rng, _PALETTES["gear"])
    cx, cy, th = _placement(rng)
    R = rng.uniform(0.3, 0.4)
    depth = R * rng.uniform(0.12, 0.2)
    teeth = int(rng.integers(8, 17))
    ri = R * rng.uniform(0.18, 0.32)

    def outline(x: FloatArray, y: FloatArray) -> tuple[FloatArray, FloatArray]:
        u, v = _rotate(x, y, cx, cy, th)
        r, phi = np.hypot(u, v), np.arctan2(v, u)
        tooth = np.clip(0.5 + 1.5 * np.sin(teeth * phi), 0.0, 1.0)  # trapezoidal teeth
        # Radial distance to the toothed rim; the flanks are steep, so scale it down to stay near a true sdf.
        outer = (r - (R - depth * (1.0 - tooth))) * 0.7
        return np.maximum(outer, ri - r), outer

    sdf, outer = outline(cv.x, cv.y)
    u, v = _rotate(cv.x, cv.y, cx, cy, th)
    r, phi = np.hypot(u, v), np.arctan2(v, u)
    hub = np.where((r > ri + 0.08 * R) & (r < ri + 0.12 * R), 0.75, 1.0)
    rim = np.where(np.abs(r - (R - depth - 0.05 * R)) < 0.02 * R, 0.8, 1.0)
    rgb = _metal(rng, phi, col) * (hub * rim)[..., None]
    rgb = rgb * (1.0 + 0.35 * _bevel(sdf, 0.04 * R, cv))[..., None]
    return _Object(rgb, sdf, outer, lambda x, y: outline(x, y)[0], R, (cx, cy), name)


def _cylinder(v: FloatArray, half_width) -> FloatArray:
    """Shade across a cylinder seen from the side: darker flanks and a specular streak."""
    t = np.clip(v / half_width, -1.0, 1.0)
    return (1.05 - 0.45 * t**2 + 0.35 * np.exp(-(((t + 0.4) / 0.18) ** 2))).astype(np.float32)


def _paint_screw(rng: np.random.Generator, cv: _Canvas) -> _Object:
    name, col = _pick_color(rng, _PALETTES["screw"])
    cx, cy, th = _placement(rng)
    half_len = rng.uniform(0.3, 0.4)
    hw = rng.uniform(0.05, 0.075)
    hr, hl = hw * rng.uniform(1.5, 2.0), hw * rng.uniform(1.0, 1.6)
    pitch = rng.uniform(0.018, 0.03)
    head_end = -half_len + hl

    def outline(x: FloatArray, y: FloatArray) -> FloatArray:
        u, v = _rotate(x, y, cx, cy, th)
        head = np.maximum(np.abs(u - (-half_len + hl / 2)) - hl / 2, np.abs(v) - hr)
        taper = np.clip((half_len - u) / (2.5 * hw), 0.15, 1.0)  # pointed tip
        shaft = np.maximum.reduce([np.abs(v) - hw * taper, u - half_len, head_end - u])
        return np.minimum(head, shaft)

    sdf = outline(cv.x, cv.y)
    u, v = _rotate(cv.x, cv.y, cx, cy, th)
    on_head = u < head_end
    thread = np.where(on_head, 1.0, 0.78 + 0.22 * np.sin(2 * np.pi * (u + 0.35 * v) / pitch))
    shade = np.where(on_head, _cylinder(v, hr), _cylinder(v, hw)) * thread
    rgb = col * shade[..., None] * (1.0 + 0.25 * _bevel(sdf, 0.01, cv))[..., None]
    # Thin objects: defects are sized on a floor radius so they stay visible (prototype lesson).
    return _Object(rgb.astype(np.float32), sdf, sdf, outline, 0.24, (cx, cy), name)


def _paint_capsule(rng: np.random.Generator, cv: _Canvas) -> _Object:
    name, c1 = _pick_color(rng, _PALETTES["capsule"])
    c2 = c1 if rng.random() < 0.3 else _pick_color(rng, _PALETTES["capsule"], avoid=c1, min_dist=0.18)[1]
    cx, cy, th = _placement(rng)
    half_seg = rng.uniform(0.15, 0.24)
    r = rng.uniform(0.11, 0.16)

    def outline(x: FloatArray, y: FloatArray) -> FloatArray:
        u, v = _rotate(x, y, cx, cy, th)
        return np.hypot(np.maximum(np.abs(u) - half_seg, 0.0), v) - r

    sdf = outline(cv.x, cv.y)
    u, v = _rotate(cv.x, cv.y, cx, cy, th)
    seam = np.where(np.abs(u) < 0.004, 0.8, 1.0)
    shade = _cylinder(v, r) * seam
    rgb = np.where((u < 0)[..., None], c1, c2) * shade[..., None]
    return _Object(rgb.astype(np.float32), sdf, sdf, outline, max(r * 1.6, 0.24), (cx, cy), name)


def _paint_pill(rng: np.random.Generator, cv: _Canvas) -> _Object:
    name, col = _pick_color(rng, _PALETTES["pill"])
    cx, cy, th = _placement(rng)
    b = rng.uniform(0.22, 0.31)
    a = b * rng.uniform(1.0, 1.45)

    def outline(x: FloatArray, y: FloatArray) -> FloatArray:
        u, v = _rotate(x, y, cx, cy, th)
        return (np.hypot(u / a, v / b) - 1.0) * b  # ellipse: an sdf up to the aspect ratio

    sdf = outline(cv.x, cv.y)
    u, v = _rotate(cv.x, cv.y, cx, cy, th)
    rn2 = (u / a) ** 2 + (v / b) ** 2
    shade = 1.05 - 0.3 * rn2 + 0.3 * np.exp(-((u / a + 0.3) ** 2 + (v / b + 0.35) ** 2) / 0.04)
    if rng.random() < 0.5:  # a score line: a normal feature that is not a scratch
        shade = shade * np.where((np.abs(v) < 0.006) & (np.abs(u) < 0.8 * a), 0.75, 1.0)
    rgb = col * shade[..., None] * (1.0 + 0.3 * _bevel(sdf, 0.04, cv))[..., None]
    return _Object(rgb.astype(np.float32), sdf, sdf, outline, b, (cx, cy), name)


def _paint_bottle(rng: np.random.Generator, cv: _Canvas) -> _Object:
    """A bottle seen from above: rim, shoulder rings and the dark opening of the neck."""
    name, col = _pick_color(rng, _PALETTES["bottle"])
    cx, cy, _ = _placement(rng)
    R = rng.uniform(0.33, 0.43)
    neck = rng.uniform(0.28, 0.38)

    def outline(x: FloatArray, y: FloatArray) -> FloatArray:
        return np.hypot(x - np.float32(cx), y - np.float32(cy)) - R

    sdf = outline(cv.x, cv.y)
    rn = np.hypot(cv.x - np.float32(cx), cv.y - np.float32(cy)) / R
    rings = 0.8 + 0.2 * np.cos(2 * np.pi * rn / rng.uniform(0.12, 0.2))
    shade = np.where(rn > 0.9, 1.2, rings)
    shade = np.where((rn > neck) & (rn < neck + 0.1), 1.25, shade)
    shade = np.where(rn <= neck, 0.2 + 0.3 * rn / neck, shade)
    rgb = col * shade[..., None] * (1.0 + 0.3 * _bevel(sdf, 0.05 * R, cv))[..., None]
    return _Object(rgb.astype(np.float32), sdf, sdf, outline, R, (cx, cy), name)


_TEXTURE_PAINTERS: dict[str, Callable[[np.random.Generator, _Canvas], tuple[FloatArray, str]]] = {
    "carpet": _paint_carpet,
    "tile": _paint_tile,
    "grid": _paint_grid,
    "fabric": _paint_fabric,
    "wood": _paint_wood,
    "marble": _paint_marble,
    "leather": _paint_leather,
    "wallpaper": _paint_wallpaper,
}
_OBJECT_PAINTERS: dict[str, Callable[[np.random.Generator, _Canvas], _Object]] = {
    "nut": _paint_nut,
    "washer": _paint_washer,
    "gear": _paint_gear,
    "screw": _paint_screw,
    "capsule": _paint_capsule,
    "pill": _paint_pill,
    "bottle": _paint_bottle,
}


# ------------------------------------------------------------------------------------------------- scene
@dataclass
class Scene:
    """A clean rendering, kept in layers so that a defect can rewrite the surface and nothing else.

    The image is ``quantise(base * light + noise)``. For objects, ``support`` is the object's coverage in
    [0, 1], ``sdf``/``outer`` its signed distances (with/without inner holes) and ``background`` the surface
    under it (with its shadow); all four are None for textures.
    """

    category: str
    color: str
    size: int
    base: FloatArray
    light: FloatArray
    noise: FloatArray
    scale: float
    center: tuple[float, float] = (0.5, 0.5)
    support: FloatArray | None = None
    sdf: FloatArray | None = None
    outer: FloatArray | None = None
    background: FloatArray | None = None

    def compose(self, base: FloatArray | None = None) -> np.ndarray:
        """uint8 (S, S, 3) image of ``base`` (default: the clean surface) under the light and noise."""
        # One dtype on both paths, so that an untouched pixel rounds to the very same byte.
        surface = self.base if base is None else np.asarray(base, np.float32)
        out = (surface * self.light + self.noise) * 255.0 + 0.5
        return np.clip(out, 0.0, 255.0).astype(np.uint8)


def _background(rng: np.random.Generator, cv: _Canvas, avoid: FloatArray) -> FloatArray:
    """A plain, slightly uneven surface whose colour contrasts with the object (so a missing part shows)."""
    _, rgb = _pick_color(rng, _BACKGROUNDS, avoid=avoid, min_dist=0.33)
    mottle = 0.94 + 0.12 * _smooth_noise(rng, cv.size, 4)
    return rgb * mottle[..., None]


def _lighting(rng: np.random.Generator, cv: _Canvas) -> FloatArray:
    """Global gain x a gradient brighter towards the light x a vignette, shape (S, S, 1)."""
    gain = rng.uniform(0.85, 1.12)
    slope = rng.uniform(0.0, 0.2)
    vignette = rng.uniform(0.0, 0.3)
    lx, ly = cv.light
    gradient = 1.0 + slope * 2.0 * ((cv.x - 0.5) * lx + (cv.y - 0.5) * ly)
    falloff = 1.0 - vignette * 2.0 * ((cv.x - 0.5) ** 2 + (cv.y - 0.5) ** 2)
    return (gain * gradient * falloff)[..., None].astype(np.float32)


def _sensor_noise(rng: np.random.Generator, size: int) -> FloatArray:
    """Pixel noise, mostly shared by the channels (luminance) with a weaker colour part."""
    sigma = rng.uniform(0.006, 0.025)
    # Luminance: a difference of uniforms (triangular, unit variance), near-Gaussian and much faster to draw
    # than normals; colour: uniform, unit variance.
    u = rng.random((size, size, 5), dtype=np.float32)
    lum = (u[..., :1] - u[..., 1:2]) * np.float32(np.sqrt(6.0) * sigma)
    return lum + (u[..., 2:] - np.float32(0.5)) * np.float32(0.4 * np.sqrt(12.0) * sigma)


def _check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise ValueError(f"unknown SynthAD category {category!r}; available: {', '.join(CATEGORIES)}")


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 16:
        raise ValueError(f"size must be an integer >= 16 (pixels per side), got {size!r}")


def draw_scene(category: str, rng: np.random.Generator, size: int = 224) -> Scene:
    """Render the clean layers of one image of ``category`` (see the module docstring)."""
    _check_category(category)
    _check_size(size)
    x, y = _grid(int(size))
    angle = rng.uniform(0, 2 * np.pi)
    cv = _Canvas(int(size), x, y, (float(np.cos(angle)), float(np.sin(angle))))
    if category in _TEXTURE_PAINTERS:
        base, color = _TEXTURE_PAINTERS[category](rng, cv)
        return Scene(
            category,
            color,
            cv.size,
            np.clip(base, 0, 1).astype(np.float32),
            _lighting(rng, cv),
            _sensor_noise(rng, cv.size),
            scale=0.5,
        )
    obj = _OBJECT_PAINTERS[category](rng, cv)
    support = _coverage(obj.sdf, cv.size)
    # Contrast with the object as shaded, not its nominal colour, so that a missing part always shows.
    shaded = (np.clip(obj.rgb, 0, 1) * support[..., None]).reshape(-1, 3).sum(0) / max(support.sum(), 1.0)
    ground = _background(rng, cv, avoid=shaded)
    reach = rng.uniform(0.015, 0.035)  # the shadow falls away from the light
    shadow_sdf = obj.shape(x + np.float32(cv.light[0] * reach), y + np.float32(cv.light[1] * reach))
    shadow = _coverage(shadow_sdf, cv.size, soft_px=0.03 * cv.size) * rng.uniform(0.25, 0.45)
    background = (ground * (1.0 - shadow)[..., None]).astype(np.float32)
    base = _mix(background, np.clip(obj.rgb, 0, 1), support)
    return Scene(
        category,
        obj.color,
        cv.size,
        base,
        _lighting(rng, cv),
        _sensor_noise(rng, cv.size),
        scale=obj.scale,
        center=obj.center,
        support=support,
        sdf=obj.sdf,
        outer=obj.outer,
        background=background,
    )


# ----------------------------------------------------------------------------------------------- defects
def _pick_point(scene: Scene, rng: np.random.Generator, on_edge: bool = False) -> tuple[float, float]:
    """A defect centre: anywhere away from the frame border (textures), or on the object's interior or
    outer edge (objects)."""
    if scene.sdf is None:
        x, y = rng.uniform(0.15, 0.85, 2)
        return float(x), float(y)
    px = 1.0 / scene.size
    if on_edge:
        candidates = np.abs(scene.outer) < 1.5 * px
    else:
        candidates = scene.sdf < -min(0.03, 0.25 * scene.scale)
        if not candidates.any():
            candidates = scene.sdf < 0
    rows, cols = np.nonzero(candidates)
    k = rng.integers(rows.size)
    return float((cols[k] + 0.5) * px), float((rows[k] + 0.5) * px)


def _blob(
    rng: np.random.Generator, scene: Scene, cx: float, cy: float, radius: float, rough: float, harmonics: int
) -> FloatArray:
    """Coverage of an irregular ellipse: its radius is modulated by random angular harmonics 2..harmonics."""
    x, y = _grid(scene.size)
    rx, ry = (float(r) for r in radius * rng.uniform(0.7, 1.3, 2))
    u, v = _rotate(x, y, cx, cy, rng.uniform(0, np.pi))
    phi = np.arctan2(v / ry, u / rx)
    wave = np.zeros_like(phi)
    for k in range(2, harmonics + 1):
        wave += rng.normal(0, 1.0 / k) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    rn = np.hypot(u / rx, v / ry) / (1.0 + rough * np.clip(wave, -1.5, 1.5))
    return _coverage((rn - 1.0) * min(rx, ry), scene.size)


def _line_coverage(scene: Scene, points: list[tuple[float, float]], widths: Sequence[int]) -> FloatArray:
    """Binary coverage of a polyline drawn with PIL; ``widths[i]`` (pixels) is used for segment ``i``."""
    canvas = Image.new("L", (scene.size, scene.size), 0)
    draw = ImageDraw.Draw(canvas)
    pix = [(px * scene.size, py * scene.size) for px, py in points]
    for i, w in enumerate(widths):
        draw.line([pix[i], pix[i + 1]], fill=255, width=int(w))
        # Round joints: PIL's thick segments alone leave notches at bends and, for short segments,
        # pixels detached from the stroke.
        r = w / 2.0
        for x, y in (pix[i], pix[i + 1]):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    return (np.asarray(canvas) > 127).astype(np.float32)


def _line_width(scene: Scene, rng: np.random.Generator, lo: float, hi: float) -> int:
    """A stroke width in pixels: a fraction of the frame, never thinner than 2 px."""
    return max(2, round(rng.uniform(lo, hi) * scene.size))


def _region_mean(scene: Scene, alpha: FloatArray) -> FloatArray:
    weight = alpha.sum()
    if weight <= 0:
        return scene.base.reshape(-1, 3).mean(0)
    return (scene.base * alpha[..., None]).reshape(-1, 3).sum(0) / weight


def _contrast_target(scene: Scene, alpha: FloatArray, dark: float, bright: float, pivot: float) -> FloatArray:
    """A grey level that contrasts with the surface under ``alpha``: dark on light surfaces, light on dark."""
    level = dark if _luma(_region_mean(scene, alpha)) > pivot else bright
    return np.full(3, level, np.float32)


def _scratch(scene: Scene, rng: np.random.Generator) -> tuple[FloatArray, FloatArray]:
    """A long, slightly curved, thin stroke, lighter or darker than the surface."""
    x, y = _pick_point(scene, rng)
    length = scene.scale * rng.uniform(0.6, 1.1)
    th = rng.uniform(0, np.pi)
    dx, dy = 0.5 * length * np.cos(th), 0.5 * length * np.sin(th)
    bend = rng.uniform(-0.15, 0.15) * length
    t = np.linspace(0.0, 1.0, 17)
    # A quadratic Bezier through the centre, bowed sideways by ``bend``.
    px = (1 - t) ** 2 * (x - dx) + 2 * t * (1 - t) * (x - bend * np.sin(th)) + t**2 * (x + dx)
    py = (1 - t) ** 2 * (y - dy) + 2 * t * (1 - t) * (y + bend * np.cos(th)) + t**2 * (y + dy)
    width = _line_width(scene, rng, 0.012, 0.02)
    alpha = _line_coverage(scene, list(zip(px, py, strict=True)), [width] * 16) * rng.uniform(0.8, 0.95)
    return alpha, _contrast_target(scene, alpha, dark=0.08, bright=0.95, pivot=0.55)


def _crack(scene: Scene, rng: np.random.Generator) -> tuple[FloatArray, FloatArray]:
    """A jagged random walk that thins towards its end, sometimes with a branch; dark, or pale on dark."""
    x, y = _pick_point(scene, rng)
    steps = int(rng.integers(14, 24))
    step = scene.scale * rng.uniform(0.7, 1.1) / steps
    th = rng.uniform(0, 2 * np.pi)
    if scene.support is not None:  # head roughly towards the centre, so the crack stays on the object
        th = np.arctan2(scene.center[1] - y, scene.center[0] - x) + rng.normal(0, 0.5)
    points = [(x, y)]
    for _ in range(steps):
        th += rng.normal(0, 0.45)
        x, y = x + step * np.cos(th), y + step * np.sin(th)
        points.append((x, y))
    w0 = _line_width(scene, rng, 0.012, 0.018)
    widths = np.linspace(w0, max(2, 0.5 * w0), steps).round().astype(int)
    alpha = _line_coverage(scene, points, widths)
    if rng.random() < 0.5:
        start = int(rng.integers(2, steps - 4))
        bx, by = points[start]
        bth = th + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.2)
        branch = [(bx, by)]
        for _ in range(steps // 3):
            bth += rng.normal(0, 0.45)
            bx, by = bx + step * np.cos(bth), by + step * np.sin(bth)
            branch.append((bx, by))
        alpha = np.maximum(alpha, _line_coverage(scene, branch, [max(2, w0 - 1)] * (len(branch) - 1)))
    return alpha, _contrast_target(scene, alpha, dark=0.05, bright=0.8, pivot=0.3)


def _hole(scene: Scene, rng: np.random.Generator) -> tuple[FloatArray, FloatArray]:
    """A round opening: a dark cavity, or (on a dark surface) light shining through."""
    x, y = _pick_point(scene, rng)
    alpha = _blob(rng, scene, x, y, scene.scale * rng.uniform(0.12, 0.2), rough=0.08, harmonics=4)
    return alpha, _contrast_target(scene, alpha, dark=rng.uniform(0.02, 0.08), bright=0.85, pivot=0.3)


def _stain(scene: Scene, rng: np.random.Generator) -> tuple[FloatArray, FloatArray]:
    """A translucent irregular blot of a colour far from the surface's, uneven in density."""
    x, y = _pick_point(scene, rng)
    shape = _blob(rng, scene, x, y, scene.scale * rng.uniform(0.18, 0.3), rough=0.25, harmonics=7)
    density = rng.uniform(0.65, 0.9) * (0.75 + 0.25 * _smooth_noise(rng, scene.size, 12))
    alpha = shape * density
    _, rgb = _pick_color(rng, _PLAIN, avoid=_region_mean(scene, shape), min_dist=0.28)
    return alpha.astype(np.float32), rgb


def _missing(scene: Scene, rng: np.random.Generator) -> tuple[FloatArray, FloatArray]:
    """Objects: a bite out of the outline shows the background. Textures: torn material shows the backing."""
    if scene.background is not None:
        x, y = _pick_point(scene, rng, on_edge=True)
        alpha = _blob(rng, scene, x, y, scene.scale * rng.uniform(0.3, 0.45), rough=0.2, harmonics=6)
        return alpha, scene.background
    x, y = _pick_point(scene, rng)
    alpha = _blob(rng, scene, x, y, scene.scale * rng.uniform(0.22, 0.34), rough=0.35, harmonics=12)
    backing = _contrast_target(
        scene, alpha, dark=rng.uniform(0.1, 0.2), bright=rng.uniform(0.75, 0.85), pivot=0.5
    )
    return alpha, backing * (0.9 + 0.2 * _smooth_noise(rng, scene.size, 16))[..., None]


def _color(scene: Scene, rng: np.random.Generator) -> tuple[FloatArray, FloatArray]:
    """A patch re-tinted to another hue, keeping the surface's shading (luminance)."""
    x, y = _pick_point(scene, rng)
    alpha = _blob(rng, scene, x, y, scene.scale * rng.uniform(0.25, 0.4), rough=0.2, harmonics=5)
    alpha = alpha * rng.uniform(0.85, 1.0)
    _, tint = _pick_color(rng, _SATURATED, avoid=_region_mean(scene, alpha), min_dist=0.3)
    target = tint * (0.35 + 0.9 * _luma(scene.base))[..., None]
    return alpha, np.clip(target, 0, 1).astype(np.float32)


_DEFECT_MAKERS: dict[str, Callable[[Scene, np.random.Generator], tuple[FloatArray, FloatArray]]] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "crack": _crack,
    "missing": _missing,
    "color": _color,
}


def _check_defect(defect: str) -> None:
    if defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; available: {', '.join(DEFECTS)} (or 'random')")


def apply_defect(scene: Scene, defect: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Damage ``scene``'s surface with one defect; return the uint8 image and its exact mask.

    The defect rewrites ``base`` inside its coverage (clipped to the object), and the mask is the set of
    pixels whose bytes differ from ``scene.compose()``: every other pixel is unchanged by construction. An
    attempt that changes less than :data:`MIN_MEAN_CHANGE` on average, leaves more than 10 % of its core
    unchanged, or covers less than 0.15 % of the frame is redrawn (at most 12 tries; the best one is kept).
    """
    _check_defect(defect)
    clean = scene.compose()
    min_area = max(4.0, _MIN_AREA * scene.size**2)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(_MAX_TRIES):
        alpha, target = _DEFECT_MAKERS[defect](scene, rng)
        if scene.support is not None:
            alpha = alpha * scene.support
        image = scene.compose(scene.base + alpha[..., None] * (target - scene.base))
        diff = np.abs(image.astype(np.int16) - clean.astype(np.int16))
        mask = diff.any(axis=-1)
        core = alpha >= 0.5
        change = float(diff[mask].mean()) if mask.any() else 0.0
        coverage = (mask & core).sum() / max(1, core.sum())
        if change >= MIN_MEAN_CHANGE and coverage >= _MIN_COVERAGE and mask.sum() >= min_area:
            return image, mask
        score = change * min(coverage, 1.0) * min(1.0, mask.sum() / min_area)
        if best is None or score > best[0]:
            best = (score, image, mask)
    assert best is not None
    return best[1], best[2]


# ------------------------------------------------------------------------------------------------ render
def render(
    category: str, rng: np.random.Generator, size: int = 224, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One image of ``category``: the clean scene, then (optionally) one defect.

    Args:
        category: a key of :data:`CATEGORIES`.
        rng: the only source of randomness; the clean part draws the same numbers whatever ``defect`` is,
            so ``render(c, default_rng(s), defect=d)`` differs from the clean render only inside its mask.
        size: side in pixels.
        defect: None (normal), a key of :data:`DEFECTS`, or ``"random"`` (uniform over them).

    Returns:
        ``(image uint8 (S, S, 3), mask bool (S, S), info)`` with ``info = {"category", "color", "defect"}``;
        ``color`` is the name of the main colour, ``defect`` None for normal images.
    """
    if defect is not None and defect != "random":
        _check_defect(defect)
    scene = draw_scene(category, rng, size)
    info: dict[str, Any] = {"category": category, "color": scene.color, "defect": None}
    if defect is None:
        return scene.compose(), np.zeros((scene.size, scene.size), bool), info
    if defect == "random":
        defect = DEFECTS[rng.integers(len(DEFECTS))]
    image, mask = apply_defect(scene, defect, rng)
    info["defect"] = defect
    return image, mask, info


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """PIL bicubic resize of a uint8 RGB image, as the dataset loader does to PNGs on disk."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a 0/255 mask, then ``> 0.5`` (value > 127), as the dataset loader does."""
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR)) > 127


def _resolve_categories(categories: Sequence[str] | None) -> tuple[str, ...]:
    if categories is None:
        return CATEGORIES
    if isinstance(categories, str):
        categories = [categories]
    cats = tuple(categories)
    if not cats:
        raise ValueError("categories is empty; pass None for all of them")
    for c in cats:
        _check_category(c)
    return cats


def sample_batch(
    rng: np.random.Generator | int | Sequence[int],
    categories: Sequence[str] | None,
    n: int,
    size: int = 224,
    p_defect: float = 0.5,
    out_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """``n`` random images for a training stream: uniform categories, defective with probability ``p_defect``.

    ``rng`` may be a Generator or a seed (an int or a sequence of ints), which is handy in a
    ``multiprocessing.Pool`` (``pool.starmap(sample_batch, [((seed, k), cats, 64, 224) for k in ...])``).
    With ``out_size``, every image is rendered at ``size`` and downsampled exactly as the loader downsamples
    a PNG (:func:`resize_image`, :func:`resize_mask`).

    Returns:
        images uint8 (n, S', S', 3), masks bool (n, S', S'), and one ``info`` dict per image.
    """
    gen = np.random.default_rng(rng)
    cats = _resolve_categories(categories)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= p_defect <= 1.0:
        raise ValueError(f"p_defect must be in [0, 1], got {p_defect}")
    _check_size(size)
    side = size if out_size is None else out_size
    if out_size is not None:
        _check_size(out_size)
    images = np.zeros((n, side, side, 3), np.uint8)
    masks = np.zeros((n, side, side), bool)
    infos = []
    for i in range(n):
        category = cats[gen.integers(len(cats))]
        defect = "random" if gen.random() < p_defect else None
        image, mask, info = render(category, gen, size, defect)
        if out_size is not None:
            image, mask = resize_image(image, out_size), resize_mask(mask, out_size)
        images[i], masks[i] = image, mask
        infos.append(info)
    return images, masks, infos


# ---------------------------------------------------------------------------------------------- captions
# WinCLIP / APRIL-GAN style templates, so that the papers' hand-crafted prompt ensembles mean something to a
# model trained here (prompts.py holds the ensembles themselves).
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a low resolution photo of the {}.",
    "a good photo of the {}.",
    "a bad photo of a {}.",
    "there is a {} in the scene.",
    "this is one {} in the scene.",
    "an industrial photo of a {}.",
)
NORMAL_STATES: tuple[str, ...] = (
    "flawless",
    "perfect",
    "unblemished",
    "normal",
    "good",
    "intact",
    "pristine",
    "clean",
)
NORMAL_SUFFIXES: tuple[str, ...] = ("without defect", "without flaw", "without damage")
# CLIP-AD's bank negates specific defects ("{} without scratch"); show the model such negations too.
NEGATED_SUFFIXES: tuple[str, ...] = ("without scratch", "without crack", "without contamination")
ABNORMAL_STATES: tuple[str, ...] = (
    "damaged",
    "broken",
    "defective",
    "flawed",
    "abnormal",
    "imperfect",
    "faulty",
    "blemished",
)
ABNORMAL_SUFFIXES: tuple[str, ...] = ("with defect", "with flaw", "with damage")
DEFECT_STATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "scratch": (("scratched",), ("with a scratch", "with scratches")),
    "hole": (("punctured", "holed"), ("with a hole",)),
    "stain": (("stained", "contaminated"), ("with a stain", "with contamination")),
    "crack": (("cracked",), ("with a crack", "with cracks")),
    "missing": (("chipped", "incomplete"), ("with a missing part", "with a missing piece")),
    "color": (("discolored",), ("with a color defect", "with discoloration")),
}
_VOWEL_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def fix_articles(text: str) -> str:
    """``a`` -> ``an`` before a vowel ("a intact nut" -> "an intact nut")."""
    return _VOWEL_ARTICLE.sub(r"\1n ", text)


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[rng.integers(len(options))]


def caption(
    rng: np.random.Generator,
    category: str,
    info: dict[str, Any],
    p_specific: float = 0.6,
    p_color: float = 0.35,
) -> str:
    """A state caption for contrastive training, e.g. "a close-up photo of a scratched red nut.".

    Normal images get a normal state word or suffix (sometimes a negated defect, or the bare class name);
    defective ones the defect's own words with probability ``p_specific``, else a generic abnormal word.
    The prototype found this mix (specific words ~60 %) better than coarse normal/abnormal labels.
    """
    _check_category(category)
    noun = CATEGORY_PHRASES[category]
    if info.get("color") and rng.random() < p_color:
        noun = f"{info['color']} {noun}"
    defect = info.get("defect")
    if defect is None:
        if rng.random() < 0.1:
            return fix_articles(_choice(rng, CAPTION_TEMPLATES).format(noun))
        prefixes, suffixes = NORMAL_STATES, NORMAL_SUFFIXES * 2 + NEGATED_SUFFIXES
    else:
        _check_defect(defect)
        specific = rng.random() < p_specific
        prefixes, suffixes = DEFECT_STATES[defect] if specific else (ABNORMAL_STATES, ABNORMAL_SUFFIXES)
    phrase = f"{_choice(rng, prefixes)} {noun}" if rng.random() < 0.6 else f"{noun} {_choice(rng, suffixes)}"
    text = _choice(rng, CAPTION_TEMPLATES).format(phrase)
    if rng.random() < 0.3:  # WinCLIP's templates have no full stop, CLIP-AD's do
        text = text.rstrip(".")
    return fix_articles(text)


# ---------------------------------------------------------------------------------------- MVTec-layout tree
_SPLIT_TRAIN, _SPLIT_TEST_GOOD, _SPLIT_TEST_DEFECT = 0, 1, 2
CONFIG_NAME = "synthad.json"


def image_seed(seed: int, category: str, split: int, defect_index: int, index: int) -> list[int]:
    """The seed sequence of one dataset image: independent of which other categories are generated."""
    return [seed, CATEGORIES.index(category), split, defect_index, index]


def _config(seed, categories, n_train, n_test_good, n_test_per_defect, size) -> dict[str, Any]:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    for name, value in (
        ("n_train", n_train),
        ("n_test_good", n_test_good),
        ("n_test_per_defect", n_test_per_defect),
    ):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    _check_size(size)
    return {
        "generator": "zsad.data.synth",
        "version": SYNTH_VERSION,
        "seed": int(seed),
        "categories": list(_resolve_categories(categories)),
        "defects": list(DEFECTS),
        "n_train": int(n_train),
        "n_test_good": int(n_test_good),
        "n_test_per_defect": int(n_test_per_defect),
        "size": int(size),
    }


def _read_config(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # PNG is lossless whatever the level; 3 halves the time of the default 6 for ~5 % larger files.
    Image.fromarray(array).save(path, compress_level=3)


def _file_name(index: int, count: int) -> str:
    return f"{index:0{max(3, len(str(count - 1)))}d}"


def generate(
    out_dir: str | os.PathLike,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    n_train: int = 16,
    n_test_good: int = 12,
    n_test_per_defect: int = 3,
    size: int = 224,
    progress: bool = False,
) -> Path:
    """Write SynthAD in the MVTec layout with the official ``meta.json`` (methods.md 1.3).

    ``<cat>/train/good/000.png``, ``<cat>/test/good/000.png``, ``<cat>/test/<defect>/000.png`` and
    ``<cat>/ground_truth/<defect>/000_mask.png`` (0/255, mode L), then ``meta.json`` (paths relative to
    ``out_dir``) and, last, ``synthad.json`` with the arguments, which :func:`ensure` compares. Train and
    test images come from the same distribution; only their seeds (:func:`image_seed`) differ.

    Returns:
        ``out_dir`` as a Path.
    """
    from zsad.data.meta import make_record, write_meta

    config = _config(seed, categories, n_train, n_test_good, n_test_per_defect, size)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    ours = _read_config(root) is not None
    (root / CONFIG_NAME).unlink(missing_ok=True)  # an interrupted run must not look complete
    meta: dict[str, dict[str, list[dict[str, Any]]]] = {"train": {}, "test": {}}
    cats = config["categories"]
    iterator = cats
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(cats, desc="SynthAD", unit="category")
    for cat in iterator:
        if ours:  # drop files of a previous, possibly larger, SynthAD run so meta.json and disk agree
            for sub in ("train", "test", "ground_truth"):
                shutil.rmtree(root / cat / sub, ignore_errors=True)
        meta["train"][cat] = []
        for i in range(n_train):
            rng = np.random.default_rng(image_seed(seed, cat, _SPLIT_TRAIN, 0, i))
            rel = f"{cat}/train/good/{_file_name(i, n_train)}.png"
            _save_png(render(cat, rng, size)[0], root / rel)
            meta["train"][cat].append(make_record(rel, "", cat, "good", 0))
        meta["test"][cat] = []
        for i in range(n_test_good):
            rng = np.random.default_rng(image_seed(seed, cat, _SPLIT_TEST_GOOD, 0, i))
            rel = f"{cat}/test/good/{_file_name(i, n_test_good)}.png"
            _save_png(render(cat, rng, size)[0], root / rel)
            meta["test"][cat].append(make_record(rel, "", cat, "good", 0))
        for d, defect in enumerate(DEFECTS):
            for i in range(n_test_per_defect):
                rng = np.random.default_rng(image_seed(seed, cat, _SPLIT_TEST_DEFECT, d, i))
                image, mask, _ = render(cat, rng, size, defect)
                stem = _file_name(i, n_test_per_defect)
                rel = f"{cat}/test/{defect}/{stem}.png"
                rel_mask = f"{cat}/ground_truth/{defect}/{stem}_mask.png"
                _save_png(image, root / rel)
                _save_png(mask.astype(np.uint8) * 255, root / rel_mask)
                meta["test"][cat].append(make_record(rel, rel_mask, cat, defect, 1))
    write_meta(meta, root / "meta.json")
    (root / CONFIG_NAME).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    return root


def ensure(
    out_dir: str | os.PathLike,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    n_train: int = 16,
    n_test_good: int = 12,
    n_test_per_defect: int = 3,
    size: int = 224,
    progress: bool = False,
) -> Path:
    """:func:`generate` unless ``out_dir`` already holds a complete tree made with the same arguments."""
    config = _config(seed, categories, n_train, n_test_good, n_test_per_defect, size)
    root = Path(out_dir)
    if _read_config(root) == config and (root / "meta.json").is_file():
        return root
    return generate(root, seed, categories, n_train, n_test_good, n_test_per_defect, size, progress)


# ------------------------------------------------------------------------------------------- contact sheet
def _outline(mask: np.ndarray) -> np.ndarray:
    """The one-pixel ring just outside ``mask`` (4-neighbour dilation minus the mask)."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown & ~mask


def contact_sheet(
    path: str | os.PathLike,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    size: int = 112,
    zoom: int = 2,
) -> Path:
    """Write a PNG sheet: one row per category, columns normal + each defect, masks outlined in red.

    For the README and the notebooks: it shows what the embedded world looks like. Images are rendered at
    ``size`` and enlarged ``zoom`` times (nearest neighbour) so that the one-pixel outline does not hide thin
    defects.
    """
    cats = _resolve_categories(categories)
    _check_size(size)
    side = size * zoom
    pad, label_w, head_h = 4, 72, 16
    cols = 1 + len(DEFECTS)
    sheet = Image.new("RGB", (label_w + cols * (side + pad), head_h + len(cats) * (side + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for j, title in enumerate(("normal", *DEFECTS)):
        draw.text((label_w + j * (side + pad) + 2, 2), title, fill="black", font=font)
    for i, cat in enumerate(cats):
        top = head_h + i * (side + pad)
        draw.text((4, top + side // 2 - 6), cat, fill="black", font=font)
        for j, defect in enumerate((None, *DEFECTS)):
            rng = np.random.default_rng([seed, CATEGORIES.index(cat), 9, j])
            image, mask, _ = render(cat, rng, size, defect)
            tile = image.repeat(zoom, axis=0).repeat(zoom, axis=1)
            tile[_outline(mask.repeat(zoom, axis=0).repeat(zoom, axis=1))] = (255, 0, 0)
            sheet.paste(Image.fromarray(tile), (label_w + j * (side + pad), top))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


__all__ = [
    "CAPTION_TEMPLATES",
    "CATEGORIES",
    "CATEGORY_PHRASES",
    "COLORS",
    "DEFECTS",
    "DEFECT_STATES",
    "MIN_MEAN_CHANGE",
    "OBJECTS",
    "SYNTH_VERSION",
    "TEXTURES",
    "Scene",
    "apply_defect",
    "caption",
    "contact_sheet",
    "draw_scene",
    "ensure",
    "fix_articles",
    "generate",
    "image_seed",
    "render",
    "resize_image",
    "resize_mask",
    "sample_batch",
]
