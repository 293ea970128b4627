"""Image- and pixel-level anomaly metrics: AUROC, AP, F1-max and AUPRO (two named conventions).

Protocol (docs/methods.md §1.5, pitfall 8, pitfall 21, pitfall 22):

- Every metric is computed per class; tables report the unweighted mean over classes (:func:`summarize`).
- Pixel metrics pool all pixels of all test images of a class; they are not averaged per image.
- A class with a single label (all normal or all anomalous, e.g. ColonDB) has undefined AUROC/AP/F1: they are
  NaN here and print as ``"n/a"`` (:func:`format_value`), never 0 as in AdaCLIP's code.
- AUROC, AP and F1-max follow sklearn's ``roc_auc_score``, ``average_precision_score`` and the official
  repos' F1-max over ``precision_recall_curve``; they come from one sort of the scores instead of three
  sklearn calls, which matters at 200 maps of 518x518 (about 53M pixels).
- AUPRO comes in two conventions, and every table must name the one it used:

  * ``"cflow"``: ``cal_pro_score`` of cflow-ad as copied into APRIL-GAN, AnomalyCLIP, CLIP-AD and zqhang's
    WinCLIP: 200 thresholds, FPR < 0.3 min-max rescaled to [0, 1] (:func:`aupro_cflow`).
  * ``"exact"``: the MVTec definition as computed by anomalib >= 2.3: exact ranking of all pixels, curve cut
    and interpolated at FPR 0.3, area divided by 0.3 (:func:`aupro_exact`).

Both AUPRO conventions label the ground-truth regions once (8-connectivity, the default of both
``skimage.measure.label`` on 2-D masks and ``cv2.connectedComponents``) and never relabel per threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage

AUPRO_CONVENTIONS = ("cflow", "exact")
CFLOW_MAX_STEP = 200

# 8-connectivity inside each image and no connection between images of the stack.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


# --------------------------------------------------------------------------------------------------
# Input conversion and validation
# --------------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors are detached and moved to the CPU."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch.Tensor, recognised without importing torch
        tensor = x.detach().cpu()
        if tensor.is_floating_point() and tensor.element_size() < 4:
            tensor = tensor.float()  # numpy has no bfloat16
        return tensor.numpy()
    return np.asarray(x)


def _as_scores(x: Any, name: str) -> np.ndarray:
    """Finite real scores; float32/float64 keep their dtype (ties and thresholds depend on it)."""
    arr = _to_numpy(x)
    if (
        arr.dtype == bool
        or not np.issubdtype(arr.dtype, np.number)
        or np.issubdtype(arr.dtype, np.complexfloating)
    ):
        raise ValueError(f"{name} must hold real-valued scores, got dtype {arr.dtype}.")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float32 if arr.dtype == np.float16 else np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contain NaN or infinite values; check the model output before scoring.")
    return arr


def _as_binary(x: Any, name: str) -> np.ndarray:
    """Binary ground truth; numeric values must lie in [0, 1] and are binarised at 0.5 (as APRIL-GAN does)."""
    arr = _to_numpy(x)
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must be 0/1 (or bool / float in [0, 1]), got dtype {arr.dtype}.")
    if arr.size:
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise ValueError(f"{name} contain NaN or infinite values.")
        lo, hi = arr.min(), arr.max()
        if lo < 0 or hi > 1:
            raise ValueError(
                f"{name} must lie in [0, 1] (0 = normal, 1 = anomalous), got values in [{lo}, {hi}]; "
                "masks read from 0/255 images must be divided by 255 first."
            )
    return arr > 0.5


def _image_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _as_binary(labels, "labels")
    s = _as_scores(scores, "scores")
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise ValueError(
            f"labels and scores must be 1-D arrays of the same length (N,), got {y.shape} and {s.shape}."
        )
    if y.size == 0:
        raise ValueError("labels and scores are empty; there is nothing to score.")
    return y, s


def _pixel_inputs(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    m = _as_binary(masks, "masks")
    a = _as_scores(maps, "maps")
    if m.ndim != 3 or a.ndim != 3:
        raise ValueError(
            f"masks and maps must be 3-D (N, H, W), got masks {m.shape} and maps {a.shape}; "
            "squeeze a channel axis first, e.g. x[:, 0]."
        )
    if m.shape != a.shape:
        raise ValueError(
            f"masks {m.shape} and maps {a.shape} differ in shape; resize the masks to the map resolution "
            "(docs/methods.md pitfall 8: metrics are computed at a stated resolution)."
        )
    if m.size == 0:
        raise ValueError(f"masks and maps are empty (shape {m.shape}); there is nothing to score.")
    return m, a


# --------------------------------------------------------------------------------------------------
# AUROC, AP, F1-max
# --------------------------------------------------------------------------------------------------


def _tie_groups(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of a 1-D array (ascending) and, for each, how many elements are at or above it."""
    ordered = np.sort(values)
    is_first = np.empty(ordered.size, dtype=bool)
    is_first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=is_first[1:])
    first = np.flatnonzero(is_first)
    return ordered[first], ordered.size - first


def _at_or_above(group: np.ndarray, n_groups: int, weights: np.ndarray | None = None) -> np.ndarray:
    """For each distinct value, the (weighted) number of marked elements at or above it.

    ``group`` holds each marked element's index among the ascending distinct values.
    """
    histogram = np.bincount(group, weights=weights, minlength=n_groups)
    return np.cumsum(histogram[::-1])[::-1]


def _cumulative_counts(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives at every distinct score, from the highest score down.

    The same points as sklearn's ``_binary_clf_curve``, without its arg-sort of all samples (slow at 50M
    pixels): one sort of the values gives the tie groups, and only the positives are located among them.
    """
    flat = scores.ravel()
    values, total = _tie_groups(flat)
    tps = _at_or_above(np.searchsorted(values, flat[positive.ravel()]), values.size)
    return tps[::-1], (total - tps)[::-1]


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid rule (numpy renamed ``trapz`` to ``trapezoid``; this works with both)."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5))


def _curve_metrics(positive: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUROC, AP and F1-max from one pass; NaN for all three when only one label is present."""
    n_pos = int(np.count_nonzero(positive))
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return {"auroc": math.nan, "ap": math.nan, "f1_max": math.nan}
    tps, fps = _cumulative_counts(positive, scores)
    tpr = np.concatenate(([0.0], tps / n_pos))
    fpr = np.concatenate(([0.0], fps / n_neg))
    # sklearn's AP: sum over thresholds of (recall gain) x precision.
    precision = tps / (tps + fps)
    ap = float(np.sum(np.diff(tpr) * precision))
    # 2PR/(P+R) written with counts; equals the official formula wherever that one is finite.
    f1 = 2.0 * tps / (tps + fps + n_pos)
    return {"auroc": _trapezoid(tpr, fpr), "ap": ap, "f1_max": float(f1.max())}


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve (= sklearn ``roc_auc_score``); NaN when only one label is present."""
    return image_metrics(labels, scores)["auroc"]


def average_precision(labels: Any, scores: Any) -> float:
    """Average precision (= sklearn ``average_precision_score``); NaN when only one label is present."""
    return image_metrics(labels, scores)["ap"]


def f1_max(labels: Any, scores: Any) -> float:
    """Best F1 over all thresholds of ``precision_recall_curve`` (docs/methods.md §1.5); NaN for a single
    label."""
    return image_metrics(labels, scores)["f1_max"]


def image_metrics(labels: Any, scores: Any) -> dict[str, float]:
    """Image-level ``auroc``, ``ap`` and ``f1_max`` of one class (docs/methods.md §1.5).

    Args:
        labels: (N,) ground truth, 0 = normal, 1 = anomalous (bool, int or float in [0, 1]).
        scores: (N,) anomaly scores, higher = more anomalous (numpy, list or torch tensor).

    Returns:
        Floats in [0, 1]; all NaN when the class has a single label (docs/methods.md pitfall 22).
    """
    y, s = _image_inputs(labels, scores)
    return _curve_metrics(y, s)


def pixel_metrics(masks: Any, maps: Any, aupro_convention: str = "cflow") -> dict[str, float]:
    """Pixel-level ``auroc``, ``ap``, ``f1_max`` and ``aupro`` of one class.

    All pixels of all images are pooled (docs/methods.md pitfall 21); AUPRO uses the named convention (see
    :func:`aupro`). Masks and maps must have the same (N, H, W) shape: the resolution is the caller's stated
    choice (docs/methods.md pitfall 8). Metrics are NaN when the class has no anomalous or no normal pixel.
    """
    if aupro_convention not in AUPRO_CONVENTIONS:
        raise ValueError(f"aupro_convention must be one of {AUPRO_CONVENTIONS}, got {aupro_convention!r}.")
    m, a = _pixel_inputs(masks, maps)
    result = _curve_metrics(m, a)
    result["aupro"] = (
        _cflow_area(m, a, 0.3, CFLOW_MAX_STEP) if aupro_convention == "cflow" else _exact_area(m, a, 0.3)
    )
    return result


# --------------------------------------------------------------------------------------------------
# AUPRO
# --------------------------------------------------------------------------------------------------


def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected ground-truth regions of every image (8-connectivity), numbered 1..R across the stack."""
    return ndimage.label(masks, structure=_REGION_STRUCTURE)


def _thresholds_for(thresholds: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Thresholds in the maps' dtype that give the same ``score > th`` as numpy's float64 comparison.

    ``np.arange`` returns float64 thresholds, and numpy (>= 2) compares float32 maps with them in float64.
    For a float32 score v and the largest float32 t at or below th, ``v > th`` holds exactly when ``v > t``,
    so rounding the thresholds down lets the maps be searched without a float64 copy of every pixel.
    """
    if dtype == thresholds.dtype:
        return thresholds
    rounded = thresholds.astype(dtype)
    too_high = rounded.astype(thresholds.dtype) > thresholds
    rounded[too_high] = np.nextafter(rounded[too_high], dtype.type(-np.inf))
    return rounded


def cflow_curve(
    masks: Any, maps: Any, max_step: int = CFLOW_MAX_STEP
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Thresholds, FPR and PRO of the cflow-style curve (docs/methods.md §1.5 steps 1-2), or None if
    undefined.

    Thresholds are ``np.arange(min, max, (max - min) / max_step)`` over all maps (so 200 or 201 of them,
    depending on rounding, exactly as the official code); a pixel is predicted anomalous when ``score > th``.
    PRO is the mean over all regions of all images of the fraction of the region above the threshold; FPR is
    the fraction of normal pixels above it. Instead of relabelling per threshold, the regions are labelled
    once, the pixels above each threshold are counted in one sort of all scores, and each region pixel is
    binned once by the number of thresholds it exceeds (per-threshold overlaps are suffix sums of that).

    Returns None when there is no normal pixel, no region, or the maps are constant (no thresholds).
    """
    return _cflow_curve(*_pixel_inputs(masks, maps), max_step)


def _cflow_curve(
    masks: np.ndarray, maps: np.ndarray, max_step: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    regions, n_regions = _label_regions(masks)
    inside = regions > 0
    n_normal = masks.size - int(np.count_nonzero(inside))
    lo, hi = maps.min(), maps.max()
    if n_regions == 0 or n_normal == 0 or not hi > lo:
        return None
    thresholds = np.arange(lo, hi, (hi - lo) / max_step)
    cmp = _thresholds_for(thresholds, maps.dtype)
    above = maps.size - np.searchsorted(np.sort(maps, axis=None), cmp, side="right")
    # A region pixel exceeding k thresholds is above thresholds 0..k-1: per threshold j, sum over k > j.
    ids = regions[inside]
    exceeded = np.searchsorted(cmp, maps[inside], side="left")
    region_above = np.bincount(exceeded, minlength=thresholds.size + 1)
    overlap = np.bincount(exceeded, weights=1.0 / np.bincount(ids)[ids], minlength=thresholds.size + 1)
    region_above = np.cumsum(region_above[::-1])[::-1][1:]
    overlap = np.cumsum(overlap[::-1])[::-1][1:]
    return thresholds, (above - region_above) / n_normal, overlap / n_regions


def aupro_cflow(masks: Any, maps: Any, fpr_limit: float = 0.3, max_step: int = CFLOW_MAX_STEP) -> float:
    """AUPRO as in the official repos' ``cal_pro_score`` (cflow-ad -> APRIL-GAN -> AnomalyCLIP, CLIP-AD).

    docs/methods.md §1.5: the curve of :func:`cflow_curve` at about 200 thresholds; keep the points with
    FPR < limit, min-max rescale those FPRs to [0, 1] (so the normalisation is the observed FPR span, not the
    limit) and take the trapezoid area (sklearn ``auc``). Equal to the official loop within float rounding,
    but without relabelling the masks per threshold.

    Returns NaN where the official code has no defined value (it raises or returns NaN): no anomalous pixel,
    no normal pixel, constant maps, or fewer than two kept points with distinct FPR (e.g. a perfect binary
    map).
    """
    _check_fpr_limit(fpr_limit)
    return _cflow_area(*_pixel_inputs(masks, maps), fpr_limit, max_step)


def _cflow_area(masks: np.ndarray, maps: np.ndarray, fpr_limit: float, max_step: int) -> float:
    curve = _cflow_curve(masks, maps, max_step)
    if curve is None:
        return math.nan
    _, fpr, pro = curve
    keep = fpr < fpr_limit
    x, y = fpr[keep], pro[keep]
    if x.size < 2 or not x.max() > x.min():
        return math.nan
    x = (x - x.min()) / (x.max() - x.min())
    # FPR falls as the threshold rises; sklearn's auc integrates either direction to a positive area.
    return abs(_trapezoid(y, x))


def _exact_curve(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """FPR and PRO after each tie group of the descending ranking, from (0, 0), up to just past ``fpr_limit``.

    A normal pixel adds 1/(#normal pixels) to the FPR; a pixel of region r adds 1/(|r| * #regions) to the PRO.
    Only pixels scoring at least the m-th highest normal score, m = floor(limit * #normal) + 2, are ranked:
    the tie group of that score already has FPR > limit (the +2 absorbs float rounding in limit * #normal),
    and nothing ranked after it changes the cut curve.
    """
    regions, n_regions = _label_regions(masks)
    inside = regions > 0
    n_normal = masks.size - int(np.count_nonzero(inside))
    if n_regions == 0 or n_normal == 0:
        return None
    normal_scores = maps[~inside]
    m = min(n_normal, math.floor(fpr_limit * n_normal) + 2)
    cut = np.partition(normal_scores, n_normal - m)[n_normal - m]
    normal_top = normal_scores[normal_scores >= cut]
    del normal_scores
    ids = regions[inside]
    region_scores = maps[inside]
    area = np.bincount(ids)
    take = region_scores >= cut
    region_top, ids = region_scores[take], ids[take]

    values, total = _tie_groups(np.concatenate((normal_top, region_top)))
    group = np.searchsorted(values, region_top)
    normal_count = total - _at_or_above(group, values.size)
    fpr = np.minimum(normal_count / n_normal, 1.0)[::-1]
    pro = np.minimum(_at_or_above(group, values.size, 1.0 / (area[ids] * n_regions)), 1.0)[::-1]
    return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro))


def aupro_exact(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """AUPRO by the exact MVTec definition, as anomalib >= 2.3 computes it (docs/methods.md §1.5, "exact").

    Regions are 8-connected components of every mask, numbered across the class. All pixels are ranked once
    by score (descending); cumulative sums give the (FPR, PRO) curve with one point per distinct score,
    starting at (0, 0) and clamped to 1. The curve is cut at ``fpr_limit``, linearly interpolating PRO there,
    and the trapezoid area is divided by the limit. Sums are float64 (anomalib 2.7 accumulates in float32; on
    small random cases the two agreed within 1e-7); ties are equal scores in the input dtype.

    Unlike anomalib, which returns 0, this returns NaN when there is no anomalous or no normal pixel.
    """
    _check_fpr_limit(fpr_limit)
    return _exact_area(*_pixel_inputs(masks, maps), fpr_limit)


def _exact_area(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    curve = _exact_curve(masks, maps, fpr_limit)
    if curve is None:
        return math.nan
    fpr, pro = curve
    last = int(np.searchsorted(fpr, fpr_limit, side="right")) - 1  # last point with FPR <= limit
    if fpr[last] < fpr_limit:
        # the next point lies beyond the limit by construction of _exact_curve
        f1, f2, p1, p2 = fpr[last], fpr[last + 1], pro[last], pro[last + 1]
        x = np.concatenate((fpr[: last + 1], [fpr_limit]))
        y = np.concatenate((pro[: last + 1], [p1 + (p2 - p1) * (fpr_limit - f1) / (f2 - f1)]))
    else:
        x, y = fpr[: last + 1], pro[: last + 1]
    return _trapezoid(y, x) / x[-1]


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}.")


def aupro(masks: Any, maps: Any, convention: str = "cflow", fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, in a named convention
    (docs/methods.md §1.5).

    Args:
        masks: (N, H, W) ground truth, bool/0-1 (floats in [0, 1] are binarised at 0.5); numpy or torch.
        maps: (N, H, W) anomaly maps at the same resolution; numpy or torch.
        convention: ``"cflow"`` (official repos' ``cal_pro_score``, :func:`aupro_cflow`) or ``"exact"``
            (anomalib >= 2.3, :func:`aupro_exact`). They differ by up to a few points
            (docs/methods.md pitfall 8).
        fpr_limit: integration limit on the false positive rate.

    Returns:
        AUPRO in [0, 1], or NaN when undefined (no anomalous or no normal pixel, see the two functions).
    """
    if convention == "cflow":
        return aupro_cflow(masks, maps, fpr_limit)
    if convention == "exact":
        return aupro_exact(masks, maps, fpr_limit)
    raise ValueError(f"convention must be one of {AUPRO_CONVENTIONS}, got {convention!r}.")


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def format_value(x: float | None, digits: int = 1) -> str:
    """A metric in [0, 1] as a percentage with ``digits`` decimals ("91.3", as papers print); NaN -> "n/a"."""
    if x is None or math.isnan(x):
        return "n/a"
    return f"{100.0 * x:.{digits}f}"


def summarize(per_class: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean over classes per metric (docs/methods.md §1.5, pitfall 21), ignoring NaN classes.

    A metric that is NaN (or missing) in every class stays NaN.
    """
    names: dict[str, None] = {}
    for metrics in per_class.values():
        names.update(dict.fromkeys(metrics))
    summary = {}
    for name in names:
        values = [v for metrics in per_class.values() if not math.isnan(v := metrics.get(name, math.nan))]
        summary[name] = float(np.mean(values)) if values else math.nan
    return summary
