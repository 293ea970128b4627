"""A contact sheet of SynthAD: one row per category, the normal image and each defect."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from zsad.data.synth.catalogue import CATEGORIES, DEFECTS, _check_size, _resolve_categories
from zsad.data.synth.render import render


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
