"""Thresholds and normalised scores (issue 18): references from the metric definitions, the validation-set
rules, and ``zsad calibrate`` -> ``zsad predict`` on the embedded world."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from zsad import metrics
from zsad.cli import main
from zsad.thresholds import (
    Level,
    _Collected,
    calibrate_collected,
    f1_max_threshold,
    load_thresholds,
    quantile_threshold,
)


def _brute_force_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Every distinct score as a threshold of ``score >= t``; the best F1, the highest t among ties."""
    best_f1, best_t = -1.0, None
    for t in np.unique(scores):
        predicted = scores >= t
        tp = np.sum(predicted & labels)
        precision = tp / predicted.sum()
        recall = tp / labels.sum()
        f1 = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
        if f1 >= best_f1 - 1e-12:
            best_f1, best_t = f1, t
    return float(best_t), float(best_f1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_max_threshold_equals_brute_force_search(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.normal(labels * 1.0, 1.0), 1)  # rounded: many ties
    threshold = f1_max_threshold(labels, scores)
    expected_t, expected_f1 = _brute_force_f1_threshold(labels, scores)
    assert threshold == expected_t
    # The threshold achieves the evaluator's F1-max (docs/methods.md §1.5).
    predicted = scores >= threshold
    tp = np.sum(predicted & labels)
    assert 2 * tp / (predicted.sum() + labels.sum()) == pytest.approx(metrics.f1_max(labels, scores))
    assert expected_f1 == pytest.approx(metrics.f1_max(labels, scores))


def test_quantile_threshold_is_numpy_and_normalisation_is_anomalib_like():
    values = np.random.default_rng(0).gamma(2.0, size=(7, 9, 11))
    assert quantile_threshold(values, 0.99) == np.quantile(values.ravel(), 0.99)
    level = Level(threshold=2.0, min=0.5, max=4.5)
    x = np.linspace(-3, 9, 101)
    normalized = level.normalize(x)
    assert level.normalize(2.0) == 0.5
    assert np.all(np.diff(normalized) >= 0) and normalized.min() == 0.0 and normalized.max() == 1.0
    assert level.normalize(3.0) == pytest.approx(0.5 + 1.0 / 4.0)  # (x - t) / (max - min) + 0.5
    assert np.array_equal(normalized >= 0.5, x >= 2.0)


def _collected(normal: int, anomalous: int, seed: int = 0, defect_pixels: bool = True) -> _Collected:
    rng = np.random.default_rng(seed)
    acc = _Collected()
    for i in range(normal + anomalous):
        label = int(i >= normal)
        mask = np.zeros((8, 8), bool)
        if label and defect_pixels:
            mask[2:5, 2:5] = True
        acc.labels.append(label)
        acc.scores.append(float(rng.normal(label * 2.0)))
        acc.maps.append(rng.random((8, 8)).astype(np.float32) + mask * 1.5)
        acc.masks.append(mask)
    return acc


def test_validation_sets_without_anomalies_or_normals(capsys):
    both = _collected(10, 10)
    only_normal = _collected(12, 0, seed=1)
    thresholds = calibrate_collected({"a": both, "b": only_normal}, rule="f1-max", quantile=0.9)
    assert thresholds.classes["a"].rule == "f1-max"
    assert thresholds.classes["a"].image.threshold == f1_max_threshold(both.labels, both.scores)
    assert thresholds.classes["a"].pixel.threshold == f1_max_threshold(
        np.stack(both.masks), np.stack(both.maps)
    )
    # A class without anomalies falls back to the normal-only rule, with a warning (never the minimum score).
    assert thresholds.classes["b"].rule == "normal-quantile"
    assert thresholds.classes["b"].image.threshold == np.quantile(only_normal.scores, 0.9)
    assert "'b' has no anomalous" in capsys.readouterr().err
    # A class without calibration data uses the global (pooled) entry.
    assert thresholds.entry("unseen") is thresholds.global_entry
    # No anomaly in the whole set: normal-only rule for everything, said once.
    all_normal = calibrate_collected({"b": only_normal}, rule="f1-max")
    assert all_normal.rule == "normal-quantile" and "no anomalous image" in all_normal.warnings[0]
    with pytest.raises(ValueError, match="'c' has no normal calibration image"):
        calibrate_collected({"a": both, "c": _collected(0, 5)}, rule="f1-max")


def test_thresholds_file_errors_name_the_file(tmp_path, synthad_root, capsys):
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"image_threshold": 0.5}))
    with pytest.raises(ValueError, match="foreign.json: not a zsad thresholds file"):
        load_thresholds(foreign)
    with pytest.raises(ValueError, match="nothing.json: no such thresholds file"):
        load_thresholds(tmp_path / "nothing.json")
    image = synthad_root / "carpet" / "test" / "good" / "000.png"
    out = tmp_path / "out"
    argv = ["predict", str(image), "--method", "clip", "--backbone", "zsad-tiny", "--out", str(out)]
    assert main([*argv, "--thresholds", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "foreign.json" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def _scores(detector, root, split, cls):
    from zsad.data import load_dataset

    data = load_dataset(root, split=split, image_size=detector.image_size, classes=[cls])
    items = [data[i] for i in range(len(data))]
    with torch.inference_mode():
        scores, _ = detector.predict(torch.stack([it["image"] for it in items]), [cls] * len(items))
    return [str(it["path"]) for it in items], np.array([it["label"] for it in items]), scores.numpy()


def test_calibrate_then_predict_labels_heldout_images(synthad_root, tiny_trained, tmp_path, capsys):
    """Normal-only calibration on carpet's train split, then predict on its test images: the labels are
    ``score >= numpy quantile of the train scores`` (computed here through the dataset path), the normalised
    scores agree with them, and masks/maps are written at the images' size."""
    from zsad import methods

    ck = tmp_path / "ck"
    base = ["--method", "clip", "--backbone", "zsad-tiny"]
    argv = ["calibrate", *base, "--data", str(synthad_root), "--normal-only", "--classes", "carpet"]
    assert main([*argv, "--out", str(ck)]) == 0
    stored = json.loads((ck / "thresholds.json").read_text())
    assert stored["rule"] == "normal-quantile" and stored["data"]["split"] == "train"
    assert stored["classes"]["carpet"]["counts"] == {"images": 16, "normal": 16, "anomalous": 0}
    assert stored["zsad_version"] and stored["detector"]["method"] == "clip"

    detector = methods.create("clip", backbone=tiny_trained)
    _, _, train_scores = _scores(detector, synthad_root, "train", "carpet")
    threshold = np.quantile(train_scores.astype(np.float64), 0.99)
    assert stored["classes"]["carpet"]["image"]["threshold"] == pytest.approx(threshold, abs=1e-6)
    paths, truth, test_scores = _scores(detector, synthad_root, "test", "carpet")
    paths, truth, test_scores = paths[::3], truth[::3], test_scores[::3]  # 10 images, both labels
    expected = test_scores >= threshold
    confusion = {
        "TP": int(np.sum(expected & (truth == 1))),
        "FP": int(np.sum(expected & (truth == 0))),
        "TN": int(np.sum(~expected & (truth == 0))),
        "FN": int(np.sum(~expected & (truth == 1))),
    }
    assert confusion["TP"] > 0 and confusion["TN"] > 0  # not a degenerate labelling

    out = tmp_path / "out"
    argv = ["predict", *paths, *base, "--class-name", "carpet", "--out", str(out)]
    assert main([*argv, "--thresholds", str(ck / "thresholds.json")]) == 0
    table = pd.read_csv(out / "scores.csv")
    assert table["image"].tolist() == paths
    predicted = table["label"].to_numpy() == 1
    got = {
        "TP": int(np.sum(predicted & (truth == 1))),
        "FP": int(np.sum(predicted & (truth == 0))),
        "TN": int(np.sum(~predicted & (truth == 0))),
        "FN": int(np.sum(~predicted & (truth == 1))),
    }
    assert got == confusion
    assert np.array_equal(table["normalized_score"].to_numpy() >= 0.5, predicted)
    row = table.iloc[0]
    with Image.open(paths[0]) as im:
        size = im.size
    full = np.load(out / row["map"])
    assert full.dtype == np.float32 and full.shape == (size[1], size[0])
    with Image.open(out / row["mask"]) as mask:
        assert mask.size == size and set(np.unique(np.asarray(mask))) <= {0, 255}
    assert not list(out.glob(".*"))  # no temporary file left
