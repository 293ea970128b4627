"""SynthAD's object painters: a shaded object from a signed distance function, plus its outline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from zsad.data.synth.canvas import _bevel, _Canvas, _noise_1d, _pick_color, _placement, _rotate
from zsad.data.synth.catalogue import _PALETTES, FloatArray


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


_OBJECT_PAINTERS: dict[str, Callable[[np.random.Generator, _Canvas], _Object]] = {
    "nut": _paint_nut,
    "washer": _paint_washer,
    "gear": _paint_gear,
    "screw": _paint_screw,
    "capsule": _paint_capsule,
    "pill": _paint_pill,
    "bottle": _paint_bottle,
}
