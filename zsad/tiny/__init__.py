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
