"""Figures: right number of panels, a shared colour scale, single-label classes left out of ROC plots."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import torch

from zsad import viz


def test_overlay_grid_uses_one_colour_scale():
    images = torch.zeros(3, 3, 16, 16)
    maps = [np.full((16, 16), v) for v in (0.1, 0.5, 2.0)]
    fig = viz.overlay_grid(images, maps, [np.zeros((16, 16))] * 3, ["a", "b", "c"], columns=2)
    heat = [ax.images[1] for ax in fig.axes if len(ax.images) == 2]
    assert len(heat) == 3
    assert {im.get_clim() for im in heat} == {(0.1, 2.0)}


def test_roc_curves_skip_single_label_classes():
    scores = pd.DataFrame(
        {
            "cls_name": ["a"] * 4 + ["b"] * 2,
            "label": [0, 1, 0, 1, 1, 1],
            "score": [0.1, 0.9, 0.2, 0.8, 0.5, 0.6],
        }
    )
    ax = viz.roc_curves(scores).axes[0]
    labels = [line.get_label() for line in ax.lines if not line.get_label().startswith("_")]
    assert labels == ["a (AUROC 100.0)"]


def test_per_class_bars_one_bar_per_class_and_run():
    table = pd.DataFrame({"image_auroc": [0.7, 0.9]}, index=["x", "y"])
    fig = viz.per_class_bars({"m1": table, "m2": table * 0.5})
    assert len(fig.axes[0].patches) >= 4
