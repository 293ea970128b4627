"""zsad-tiny: the small open_clip CLIP that zsad trains on its synthetic defect world and ships (design.md).

``model_configs/zsad-tiny.json`` is its open_clip architecture config; :mod:`zsad.backbone` registers it with
open_clip on import, so ``open_clip.create_model("zsad-tiny")`` and ``zsad.backbone.load_clip("zsad-tiny")``
both work. The trained weights live next to it as ``zsad-tiny.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_NAME = "zsad-tiny"
TINY_DIR = Path(__file__).resolve().parent
WEIGHTS_FILE = TINY_DIR / "zsad-tiny.safetensors"
CARD_FILE = TINY_DIR / "zsad-tiny.json"
CONFIG_DIR = TINY_DIR / "model_configs"

# SynthAD categories the trainer holds out by default (TrainConfig.heldout): defined here, below the
# trainer, so that the backbone can read this package without importing the trainer.
DEFAULT_HELDOUT: tuple[str, ...] = ("wood", "pill")


def load_card() -> dict[str, Any] | None:
    """The model card written by ``python -m zsad.tiny train`` / ``measure``; None before first training."""
    return json.loads(CARD_FILE.read_text()) if CARD_FILE.exists() else None


# The embedded world's auxiliary training sets (the papers train on another dataset's test split,
# docs/methods.md §1.3): SynthAD's *seen* categories only, drawn with their own seed, so the held-out
# categories that every notebook evaluates on never reach a trained method. "quick" (624 images) is what the
# notebooks and most tests train on; "paper-size" (2,496 images) is the size of the papers' auxiliary sets
# (VisA test 2,162, MVTec AD test 1,725 images), for the runs that need it (AnomalyCLIP's 15-epoch schedule).
AUX_SETS: dict[str, dict[str, int]] = {
    "quick": {"seed": 2, "n_train": 2, "n_test_good": 12, "n_test_per_defect": 6},
    "paper-size": {"seed": 2, "n_train": 2, "n_test_good": 48, "n_test_per_defect": 24},
}

# A larger test split than SynthAD's default (12 good + 18 defective images per class), so that AUROCs on
# it are not decided by a handful of images: the card's zero-shot figures and the held-out comparisons.
MEASURE_SET: dict[str, int] = {"seed": 1, "n_train": 4, "n_test_good": 40, "n_test_per_defect": 10}


def seen_categories() -> list[str]:
    """SynthAD categories zsad-tiny was trained on (its card; before training, all but DEFAULT_HELDOUT)."""
    card = load_card()
    if card is not None:
        return list(card["seen_categories"])
    from zsad.data.synth import CATEGORIES

    return [c for c in CATEGORIES if c not in DEFAULT_HELDOUT]


def heldout_categories() -> list[str]:
    """SynthAD categories held out of zsad-tiny's training (from its card, else the trainer default)."""
    card = load_card()
    if card is not None:
        return list(card["heldout_categories"])
    return list(DEFAULT_HELDOUT)


def embedded_aux_root(root: str | Path | None = None, scale: str = "quick") -> Path:
    """Generate (once) and return the embedded auxiliary dataset: SynthAD, seen categories,
    :data:`AUX_SETS` [``scale``], under ``$ZSAD_HOME/synthad-aux`` (``synthad-aux-paper-size``) by default."""
    if scale not in AUX_SETS:
        raise ValueError(f"scale={scale!r} is not one of {', '.join(AUX_SETS)}")
    seen = seen_categories()
    from zsad.cache import zsad_home
    from zsad.data.synth import ensure

    default = zsad_home() / ("synthad-aux" if scale == "quick" else f"synthad-aux-{scale}")
    return ensure(Path(root) if root else default, categories=seen, **AUX_SETS[scale])


def heldout_measure_root(root: str | Path | None = None) -> Path:
    """Generate (once) and return the held-out categories of :data:`MEASURE_SET` (40 good + 60 defective
    images per class; the same images as the card's measure set), under
    ``$ZSAD_HOME/synthad-measure-heldout`` by default."""
    from zsad.cache import zsad_home
    from zsad.data.synth import ensure

    out = Path(root) if root else zsad_home() / "synthad-measure-heldout"
    return ensure(out, categories=heldout_categories(), **MEASURE_SET)
