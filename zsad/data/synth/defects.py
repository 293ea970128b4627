"""SynthAD's defects: each rewrites the scene's surface inside its own region; the mask is exact."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from zsad.data.synth.canvas import _coverage, _grid, _luma, _pick_color, _rotate, _smooth_noise
from zsad.data.synth.catalogue import (
    _MAX_TRIES,
    _MIN_AREA,
    _MIN_COVERAGE,
    _PLAIN,
    _SATURATED,
    MIN_MEAN_CHANGE,
    FloatArray,
    _check_defect,
)
from zsad.data.synth.scene import Scene


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
