"""The evaluation loop: per-class tables, the CSV contract, the feature cache and few-shot drawing."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import Dataset

from zsad.evaluate import COLUMNS, EvalResult, evaluate, fit_few_shot, metrics_table
from zsad.methods.base import Detector


class _Backbone:
    name, pretrained, image_size, weights_id = "stub", None, 16, "stub"


class MaskInChannel(Dataset):
    """Images whose first channel *is* the defect mask, so a detector can be perfect without labels."""

    def __init__(self, n_per_class: int = 6, classes=("a", "b"), single_label: str | None = None):
        g = torch.Generator().manual_seed(0)
        self.records = []
        for cls in classes:
            for i in range(n_per_class):
                anomalous = (i % 2 == 1) and cls != single_label
                mask = torch.zeros(16, 16)
                if anomalous:
                    y, x = torch.randint(0, 12, (2,), generator=g)
                    mask[y : y + 4, x : x + 4] = 1
                image = torch.rand(3, 16, 16, generator=g)
                image[0] = mask
                self.records.append(
                    {
                        "image": image,
                        "mask": mask,
                        "label": int(anomalous),
                        "cls_name": cls,
                        "path": f"/virtual/{cls}/{i}.png",
                        "anomaly": int(anomalous),
                    }
                )
        self.items = self.records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


class ChannelDetector(Detector):
    method_id = "stub"

    def __init__(self, sign: float = 1.0):
        super().__init__(_Backbone())
        self.sign = sign
        self.fitted: list[str] = []

    def predict(self, images, class_names):
        # A little texture from channel 1 keeps the maps continuous (a binary map has a degenerate PRO curve).
        maps = self.sign * (images[:, 0] + 0.01 * images[:, 1])
        return maps.flatten(1).mean(1), maps

    def fit_few_shot(self, images, class_names):
        self.fitted += class_names
        return self


def test_perfect_detector_scores_one_and_inverted_scores_zero():
    data = MaskInChannel()
    # cflow's 200 thresholds are degenerate on perfectly separated maps (all kept FPRs are 0); exact is not.
    good = evaluate(ChannelDetector(), data, batch_size=5, aupro_convention="exact", progress=False)
    assert list(good.table.columns) == list(COLUMNS)
    assert list(good.table.index) == ["a", "b", "mean"]
    assert np.allclose(good.table[["image_auroc", "pixel_auroc", "pixel_aupro"]].to_numpy(), 1.0)
    bad = evaluate(ChannelDetector(sign=-1.0), data, batch_size=3, progress=False)
    assert bad.table.loc["mean", "image_auroc"] < 0.01
    assert bad.table.loc["mean", "pixel_auroc"] < 0.01


def test_batch_size_does_not_change_results():
    data = MaskInChannel()
    a = evaluate(ChannelDetector(), data, batch_size=1, progress=False)
    b = evaluate(ChannelDetector(), data, batch_size=7, progress=False)
    pd.testing.assert_frame_equal(a.table, b.table)


def test_single_label_class_is_nan_not_zero(tmp_path):
    data = MaskInChannel(single_label="b")
    result = evaluate(ChannelDetector(), data, progress=False)
    assert math.isnan(result.table.loc["b", "image_auroc"])
    assert result.table.loc["mean", "image_auroc"] == pytest.approx(result.table.loc["a", "image_auroc"])
    assert "n/a" in result.to_markdown()
    result.save(tmp_path, {"data": "stub"})
    csv = pd.read_csv(tmp_path / "metrics.csv", keep_default_na=False)
    assert list(csv.columns) == ["class", *COLUMNS]
    assert csv["class"].tolist() == ["a", "b", "mean"]
    assert csv.loc[1, "image_auroc"] == ""


def test_metrics_table_mean_is_unweighted_over_classes():
    rng = np.random.default_rng(0)
    per_class = {}
    for cls, n in (("small", 6), ("large", 60)):
        labels = np.arange(n) % 2
        per_class[cls] = {
            "labels": list(labels),
            "scores": list(labels + rng.normal(0, 1.0, n)),
            "masks": [np.zeros((4, 4), bool)] * n,
            "maps": [np.zeros((4, 4))] * n,
        }
    table = metrics_table(per_class)
    expected = (table.loc["small", "image_auroc"] + table.loc["large", "image_auroc"]) / 2
    assert table.loc["mean", "image_auroc"] == pytest.approx(expected)
    assert math.isnan(table.loc["mean", "pixel_auroc"])  # no pixel ground truth at all


def test_save_writes_run_json_with_convention(tmp_path):
    result = evaluate(ChannelDetector(), MaskInChannel(), aupro_convention="exact", progress=False)
    result.save(tmp_path, {"data": "stub"})
    import json

    run = json.loads((tmp_path / "run.json").read_text())
    assert run["aupro_convention"] == "exact" and "torch" in run["versions"]
    assert isinstance(result, EvalResult)


def test_bad_convention_is_a_clear_error():
    with pytest.raises(ValueError, match="aupro_convention"):
        evaluate(ChannelDetector(), MaskInChannel(), aupro_convention="pro", progress=False)


def test_fit_few_shot_draws_k_normal_images_per_class_reproducibly():
    data = MaskInChannel(n_per_class=8)
    det = ChannelDetector()
    first = fit_few_shot(det, data, k=2, seed=3)
    assert det.fitted == ["a", "a", "b", "b"]
    assert all(data.items[[r["path"] for r in data.items].index(p)]["anomaly"] == 0 for p in first)
    assert fit_few_shot(ChannelDetector(), data, k=2, seed=3) == first
    with pytest.raises(ValueError, match="normal training images"):
        fit_few_shot(ChannelDetector(), data, k=5)


def test_max_images_per_class_spreads_over_the_class():
    result = evaluate(ChannelDetector(), MaskInChannel(n_per_class=8), max_images_per_class=3, progress=False)
    assert result.scores.groupby("cls_name").size().tolist() == [3, 3]
    assert set(result.scores.label) == {0, 1}  # evenly spaced, not the first three of a sorted class
    assert result.config["max_images_per_class"] == 3


class PartsDetector(ChannelDetector):
    """Exposes score parts and rewrites the scores at the end, like CLIP-AD's transductive minmax-sum."""

    def predict(self, images, class_names):
        scores, maps = super().predict(images, class_names)
        self.last_score_parts = {"negated": -scores}
        return scores, maps

    def finalize_scores(self, scores):
        return scores.assign(score=scores["negated"])


def test_finalize_scores_hook_sees_score_parts_and_drives_the_table():
    result = evaluate(PartsDetector(), MaskInChannel(), batch_size=4, progress=False)
    assert "negated" in result.scores.columns
    assert result.table.loc["mean", "image_auroc"] < 0.01  # the rewritten scores are the ones measured
    assert result.table.loc["mean", "pixel_auroc"] > 0.99  # maps untouched
