"""A clean SynthAD scene in layers (surface, light, noise), so a defect can rewrite the surface only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zsad.data.synth.canvas import _Canvas, _coverage, _grid, _mix, _pick_color, _smooth_noise
from zsad.data.synth.catalogue import _BACKGROUNDS, FloatArray, _check_category, _check_size
from zsad.data.synth.objects import _OBJECT_PAINTERS
from zsad.data.synth.textures import _TEXTURE_PAINTERS


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
