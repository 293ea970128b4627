"""Metrics against independent references: sklearn, slow straightforward loops, hand-computed cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import measure
from sklearn import metrics as skm

from zsad import metrics as M

# --------------------------------------------------------------------------------------------------
# Data and slow references (written for the test, one threshold / one region at a time)
# --------------------------------------------------------------------------------------------------


def blob_case(
    seed: int, n: int = 6, size: int = 32, levels: int | None = None, dtype=np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Masks with 0-3 discs per image (some images normal) and noisy maps that prefer the discs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        for _ in range(rng.integers(0, 4)):
            cy, cx = rng.integers(0, size, 2)
            r = rng.uniform(1.0, size / 5)
            masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = 1
    masks[0, 3:6, 3:6] = 1  # at least one region
    masks[0, 6, 6] = 1  # diagonal neighbour: joined only under 8-connectivity
    noise = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 2, 2))
    maps = noise / noise.std() + 1.5 * ndimage.gaussian_filter(masks.astype(float), sigma=(0, 1.5, 1.5))
    if levels is not None:  # many ties
        maps = np.round(maps * levels) / levels
    return masks, maps.astype(dtype)


def slow_cflow(masks: np.ndarray, maps: np.ndarray, max_step: int = 200, limit: float = 0.3) -> float:
    """docs/methods.md §1.5 literally: relabel per threshold, region overlaps, FPR < limit, rescale, sklearn
    auc."""
    lo, hi = maps.min(), maps.max()
    normal = masks == 0
    fprs, pros = [], []
    for th in np.arange(lo, hi, (hi - lo) / max_step):
        predicted = maps > th
        overlaps = []
        for mask, pred in zip(masks, predicted, strict=True):
            for region in measure.regionprops(measure.label(mask)):
                rows, cols = region.coords[:, 0], region.coords[:, 1]
                overlaps.append(pred[rows, cols].sum() / region.area)
        pros.append(np.mean(overlaps))
        fprs.append(np.logical_and(predicted, normal).sum() / normal.sum())
    fprs, pros = np.asarray(fprs), np.asarray(pros)
    kept = fprs < limit
    x = fprs[kept]
    x = (x - x.min()) / (x.max() - x.min())
    return skm.auc(x, pros[kept])


def slow_exact(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """For each distinct score u (descending): FPR and mean region overlap of ``score >= u``; cut at limit."""
    per_image = [
        (img, r.coords) for img, m in enumerate(masks) for r in measure.regionprops(measure.label(m))
    ]
    normal = masks == 0
    xs, ys = [0.0], [0.0]
    for u in np.unique(maps)[::-1]:
        predicted = maps >= u
        xs.append(np.logical_and(predicted, normal).sum() / normal.sum())
        ys.append(np.mean([predicted[img][c[:, 0], c[:, 1]].mean() for img, c in per_image]))
    area = 0.0
    for i in range(1, len(xs)):
        (x0, y0), (x1, y1) = (xs[i - 1], ys[i - 1]), (xs[i], ys[i])
        if x0 >= limit:
            break
        if x1 > limit:  # the segment crosses the limit: integrate its part below the limit only
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def brute_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & (labels == 1))
        fp = np.sum(pred & (labels == 0))
        fn = np.sum(~pred & (labels == 1))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


# --------------------------------------------------------------------------------------------------
# AUROC, AP, F1-max
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_match_sklearn_and_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = labels * 0.8 + rng.normal(size=60)
    if seed == 2:
        scores = np.round(scores, 1)  # ties
    out = M.image_metrics(labels, scores)
    assert out["auroc"] == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert out["ap"] == pytest.approx(skm.average_precision_score(labels, scores), abs=1e-12)
    assert out["f1_max"] == pytest.approx(brute_f1_max(labels, scores), abs=1e-12)
    assert M.f1_max(labels, scores) == out["f1_max"]
    assert M.auroc(labels, scores) == out["auroc"]
    assert M.average_precision(labels, scores) == out["ap"]


def test_pixel_metrics_match_sklearn_on_pooled_pixels():
    masks, maps = blob_case(3, levels=20)
    out = M.pixel_metrics(torch.from_numpy(masks), torch.from_numpy(maps))
    y, s = masks.ravel(), maps.ravel()
    assert out["auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-10)
    assert out["ap"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-10)
    assert out["f1_max"] == pytest.approx(brute_f1_max(y, s), abs=1e-10)
    assert out["aupro"] == pytest.approx(slow_cflow(masks, maps), abs=1e-6)
    exact = M.pixel_metrics(masks, maps, aupro_convention="exact")["aupro"]
    assert exact == pytest.approx(slow_exact(masks, maps), abs=1e-6)


def test_torch_half_precision_inputs():
    labels = torch.tensor([0, 1, 0, 1, 1])
    scores = torch.tensor([0.1, 0.8, 0.3, 0.2, 0.9], dtype=torch.bfloat16, requires_grad=True)
    expected = skm.roc_auc_score(labels.numpy(), scores.detach().float().numpy())
    assert M.image_metrics(labels, scores)["auroc"] == pytest.approx(expected, abs=1e-12)


def test_single_label_gives_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for labels in ([1, 1, 1], [0, 0, 0]):
            out = M.image_metrics(labels, [0.1, 0.5, 0.9])
            assert all(math.isnan(v) for v in out.values())
        out = M.pixel_metrics(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4)))
        assert set(out) == {"auroc", "ap", "f1_max", "aupro"}
        assert all(math.isnan(v) for v in out.values())
        assert math.isnan(M.aupro(np.ones((1, 3, 3)), np.zeros((1, 3, 3)), convention="exact"))
    assert M.format_value(out["auroc"]) == "n/a"


# --------------------------------------------------------------------------------------------------
# AUPRO
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "levels", "dtype"),
    [
        (0, None, np.float32),
        (1, None, np.float64),
        (2, 8, np.float32),
        (3, 3, np.float64),
        (4, None, np.float32),
    ],
)
def test_cflow_aupro_equals_slow_loop(seed, levels, dtype):
    masks, maps = blob_case(seed, levels=levels, dtype=dtype)
    if seed == 4:
        maps[1] = 0.25  # a constant map beside varying ones
        maps[2] = maps.max()
    assert M.aupro(masks, maps, "cflow") == pytest.approx(slow_cflow(masks, maps), abs=1e-6)


def test_cflow_curve_points_equal_slow_loop():
    """Each threshold's FPR and PRO, not only the area (catches errors the area could hide)."""
    masks, maps = blob_case(5, levels=12)
    thresholds, fpr, pro = M.cflow_curve(masks, maps)
    lo, hi = maps.min(), maps.max()
    np.testing.assert_array_equal(thresholds, np.arange(lo, hi, (hi - lo) / 200))
    labelled = [measure.label(m) for m in masks]
    for j in range(0, thresholds.size, 7):
        predicted = maps > thresholds[j]
        overlaps = [
            predicted[i][lab == r].mean() for i, lab in enumerate(labelled) for r in range(1, lab.max() + 1)
        ]
        assert pro[j] == pytest.approx(np.mean(overlaps), abs=1e-12)
        assert fpr[j] == pytest.approx(predicted[masks == 0].mean(), abs=1e-12)


def test_cflow_float32_scores_just_above_float64_thresholds():
    """Scores in {0, .25, .5, .75, 1} (float32): threshold 100 is 100 * float32(0.005) = 0.4999999888 in
    float64, so a score of exactly 0.5 is above it, although 0.5 is that threshold's nearest float32."""
    masks, _ = blob_case(10)
    rng = np.random.default_rng(10)
    normal_levels = rng.choice(5, masks.shape, p=[0.5, 0.3, 0.1, 0.07, 0.03])
    maps = (np.where(masks, rng.integers(0, 5, masks.shape), normal_levels) / 4).astype(np.float32)
    maps[0, 0, 0], maps[0, 0, 1] = 0.0, 1.0
    thresholds, fpr, pro = M.cflow_curve(masks, maps)
    assert 0.5 > thresholds[100] and np.float32(thresholds[100]) == 0.5
    predicted = maps > thresholds[100]
    assert fpr[100] == pytest.approx(predicted[masks == 0].mean(), abs=1e-12)
    assert M.aupro(masks, maps, "cflow") == pytest.approx(slow_cflow(masks, maps), abs=1e-6)


@pytest.mark.parametrize(("seed", "levels", "size"), [(0, None, 20), (1, 5, 32), (2, 40, 32), (6, None, 16)])
def test_exact_aupro_equals_slow_reference(seed, levels, size):
    masks, maps = blob_case(seed, n=4, size=size, levels=levels, dtype=np.float64)
    assert M.aupro(masks, maps, "exact") == pytest.approx(slow_exact(masks, maps), abs=1e-6)
    assert M.aupro(masks, maps, "exact", fpr_limit=0.05) == pytest.approx(
        slow_exact(masks, maps, limit=0.05), abs=1e-6
    )


def test_exact_aupro_hand_computed_and_extremes():
    # One image, one region (first two pixels). Ranking: 0.9 region (FPR 0, PRO .5), 0.8 normal (1/3, .5),
    # 0.2 region (1/3, 1), ...; cut at 0.3 between (0, .5) and (1/3, .5): area .3 * .5 / .3 = 0.5.
    masks = np.array([[[1, 1, 0, 0, 0]]])
    maps = np.array([[[0.9, 0.2, 0.8, 0.1, 0.05]]])
    assert M.aupro(masks, maps, "exact") == pytest.approx(0.5, abs=1e-12)
    masks, _ = blob_case(7)
    assert M.aupro(masks, masks.astype(float), "exact") == pytest.approx(1.0, abs=1e-12)
    assert M.aupro(masks, 1.0 - masks, "exact") == pytest.approx(0.0, abs=1e-12)
    # constant maps: one tie group, curve (0,0)-(1,1), so PRO(0.3) = 0.3 and AUPRO = 0.15
    assert M.aupro(masks, np.zeros(masks.shape), "exact") == pytest.approx(0.15, abs=1e-12)


def test_cflow_aupro_undefined_cases_are_nan():
    masks, maps = blob_case(8)
    assert math.isnan(M.aupro(masks, np.full(maps.shape, 0.7), "cflow"))  # no thresholds
    assert math.isnan(M.aupro(masks, masks.astype(float), "cflow"))  # every kept FPR is 0: 0/0 rescale


def test_conventions_differ_on_a_designed_case():
    """cflow rescales the observed FPR span to [0, 1]; exact integrates to 0.3 and divides by 0.3.

    One 10x10 image whose first row is one region. Region: 5 pixels at 1.0, 5 at 0.25. Normal: 9 pixels at
    0.5, 81 at 0.0. cflow: every threshold has FPR 0.1 (th < 0.5) or 0 (th >= 0.5); rescaled to 1 and 0, with
    PRO 0.5 at both ends of that span -> 0.5. exact: (0,0) (0,.5) (.1,.5) (.1,1) then FPR 1
    -> (.05 + .2) / .3 = 5/6.
    """
    masks = np.zeros((1, 10, 10), dtype=np.uint8)
    masks[0, 0] = 1
    maps = np.zeros((1, 10, 10))
    maps[0, 0, :5], maps[0, 0, 5:] = 1.0, 0.25
    maps[0, 1, :9] = 0.5
    cflow, exact = M.aupro(masks, maps, "cflow"), M.aupro(masks, maps, "exact")
    assert cflow == pytest.approx(0.5, abs=1e-12)
    assert exact == pytest.approx(5 / 6, abs=1e-12)
    assert cflow == pytest.approx(slow_cflow(masks, maps), abs=1e-12)


def test_fpr_exactly_at_the_limit():
    """Region: pixels at 0.8 and 0.3; normal: 3 pixels at 0.6 and 7 at 0, so one FPR is exactly 3/10 = 0.3.

    cflow keeps FPR < 0.3 only, which leaves the single FPR 0 -> undefined (NaN). exact keeps the point at 0.3
    and stops there: (0,0) (0,.5) (.3,.5) (.3,1) -> .15 / .3 = 0.5.
    """
    masks = np.zeros((1, 3, 4), dtype=bool)
    masks[0, 0, :2] = True
    maps = np.zeros((1, 3, 4))
    maps[0, 0, :2] = 0.8, 0.3
    maps[0, 1, :3] = 0.6
    assert math.isnan(M.aupro(masks, maps, "cflow"))
    assert M.aupro(masks, maps, "exact") == pytest.approx(0.5, abs=1e-12)


def test_float_masks_binarised_at_half():
    masks, maps = blob_case(9)
    soft = masks * 0.7 + (1 - masks) * 0.3  # bilinear-resized masks look like this
    assert M.pixel_metrics(soft, maps) == M.pixel_metrics(masks.astype(bool), maps)


# --------------------------------------------------------------------------------------------------
# Input errors, formatting, summary
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("masks", "maps", "match"),
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), "differ in shape"),
        (np.zeros((4, 4)), np.zeros((4, 4)), "3-D"),
        (np.zeros((2, 1, 4, 4)), np.zeros((2, 1, 4, 4)), "3-D"),
        (np.full((1, 2, 2), 255), np.zeros((1, 2, 2)), "divided by 255"),
        (np.zeros((1, 2, 2)), np.full((1, 2, 2), np.nan), "NaN"),
    ],
)
def test_bad_pixel_inputs_raise(masks, maps, match):
    with pytest.raises(ValueError, match=match):
        M.pixel_metrics(masks, maps)
    with pytest.raises(ValueError, match=match):
        M.aupro(masks, maps, "exact")


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="same length"):
        M.image_metrics([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="convention"):
        M.aupro(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), convention="mvtec")
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), fpr_limit=0.0)


def test_format_value():
    assert M.format_value(0.91349) == "91.3"
    assert M.format_value(1.0) == "100.0"
    assert M.format_value(0.5, digits=2) == "50.00"
    assert M.format_value(float("nan")) == "n/a"


def test_summarize_ignores_nan_per_metric():
    per_class = {
        "a": {"auroc": 0.9, "aupro": math.nan, "ap": math.nan},
        "b": {"auroc": 0.7, "aupro": 0.6, "ap": math.nan},
        "c": {"auroc": math.nan, "aupro": 0.8, "ap": math.nan},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = M.summarize(per_class)
    assert out["auroc"] == pytest.approx(0.8)
    assert out["aupro"] == pytest.approx(0.7)
    assert math.isnan(out["ap"])
