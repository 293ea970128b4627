"""SynthAD's texture painters: each fills the whole frame with one surface and names its colour."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from zsad.data.synth.canvas import (
    _Canvas,
    _coverage,
    _mix,
    _noise_1d,
    _pick_color,
    _rotate,
    _second_color,
    _smooth_noise,
)
from zsad.data.synth.catalogue import _PALETTES, FloatArray


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
