"""One SynthAD image (scene, then optionally a defect), the loader's resizes, and training batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from zsad.data.synth.catalogue import DEFECTS, _check_defect, _check_size, _resolve_categories
from zsad.data.synth.defects import apply_defect
from zsad.data.synth.scene import draw_scene


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
