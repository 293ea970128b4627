"""Measure what the zsad-tiny card promises: the plain CLIP baseline on held-out and seen SynthAD categories.

Numbers are written into ``zsad-tiny.json`` under ``zero_shot`` (per class, per defect type, macro means),
so the card always states figures measured on the shipped weights and a named SynthAD test set.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from zsad import metrics
from zsad.tiny import MEASURE_SET


def per_defect_auroc(scores: pd.DataFrame) -> pd.DataFrame:
    """Image AUROC of each defect type against the good images of the same class."""
    species = scores.path.map(lambda p: Path(p).parent.name)
    rows = {}
    for cls, group in scores.assign(specie=species).groupby("cls_name"):
        good = group[group.label == 0]
        for specie, bad in group[group.label == 1].groupby("specie"):
            both = pd.concat([good, bad])
            rows[(cls, specie)] = metrics.image_metrics(both.label.to_numpy(), both.score.to_numpy())["auroc"]
    return pd.Series(rows).unstack()


def measure(data_root: Path, card_path: Path, weights: str | None = None) -> pd.DataFrame:
    from zsad import methods
    from zsad.data import load_dataset
    from zsad.data.synth import ensure
    from zsad.evaluate import evaluate

    card = json.loads(Path(card_path).read_text())
    root = ensure(Path(data_root), **MEASURE_SET)
    detector = methods.create("clip", backbone="zsad-tiny", weights=weights)
    result = evaluate(detector, load_dataset(root, "test", image_size=detector.image_size))
    table = result.table.drop(index="mean")
    heldout = card["heldout_categories"]
    seen = [c for c in table.index if c not in heldout]
    by_defect = per_defect_auroc(result.scores)
    card["zero_shot"] = {
        "method": "clip (prompt bank winclip, 7/4 states x 22 templates)",
        "data": f"SynthAD {MEASURE_SET}",
        "heldout_image_auroc_macro": float(np.nanmean(table.loc[heldout, "image_auroc"])),
        "heldout_pixel_auroc_macro": float(np.nanmean(table.loc[heldout, "pixel_auroc"])),
        "seen_image_auroc_macro": float(np.nanmean(table.loc[seen, "image_auroc"])),
        "seen_pixel_auroc_macro": float(np.nanmean(table.loc[seen, "pixel_auroc"])),
        "per_class": {c: {k: round(float(v), 4) for k, v in row.items()} for c, row in table.iterrows()},
        "per_defect_image_auroc": {
            c: {k: round(float(v), 4) for k, v in row.items()} for c, row in by_defect.iterrows()
        },
    }
    Path(card_path).write_text(json.dumps(card, indent=2) + "\n")
    return table.assign(heldout=[c in heldout for c in table.index])
