"""State captions of SynthAD images for zsad-tiny's contrastive training."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from zsad.data.synth.catalogue import CATEGORY_PHRASES, _check_category, _check_defect

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
