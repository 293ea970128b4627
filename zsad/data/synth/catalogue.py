"""The SynthAD catalogue: categories, defects, colours and palettes, and the argument checks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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


def _check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise ValueError(f"unknown SynthAD category {category!r}; available: {', '.join(CATEGORIES)}")


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 16:
        raise ValueError(f"size must be an integer >= 16 (pixels per side), got {size!r}")


def _check_defect(defect: str) -> None:
    if defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; available: {', '.join(DEFECTS)} (or 'random')")


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
