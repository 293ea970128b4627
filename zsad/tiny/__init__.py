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


def load_card() -> dict[str, Any] | None:
    """The model card written by ``python -m zsad.tiny train`` / ``measure``; None before first training."""
    return json.loads(CARD_FILE.read_text()) if CARD_FILE.exists() else None


# The embedded world's auxiliary training set (the papers train on another dataset's test split,
# methods.md 1.3): SynthAD's *seen* categories only, drawn with their own seed, so the held-out categories
# that every notebook evaluates on never reach a trained method.
AUX_SET: dict[str, int] = {"seed": 2, "n_train": 2, "n_test_good": 12, "n_test_per_defect": 6}


def seen_categories() -> list[str]:
    """SynthAD categories zsad-tiny was trained on (from its card; the trainer default before training)."""
    card = load_card()
    if card is not None:
        return list(card["seen_categories"])
    from zsad.data.synth import CATEGORIES
    from zsad.tiny.train import TrainConfig

    return [c for c in CATEGORIES if c not in TrainConfig().heldout]


def embedded_aux_root(root: str | Path | None = None) -> Path:
    """Generate (once) and return the embedded auxiliary dataset: SynthAD, seen categories, :data:`AUX_SET`,
    under ``$ZSAD_HOME/synthad-aux`` by default."""
    seen = seen_categories()
    from zsad.cache import zsad_home
    from zsad.data.synth import ensure

    return ensure(Path(root) if root else zsad_home() / "synthad-aux", categories=seen, **AUX_SET)
