"""Benchmark: zsad's AUPRO against the straightforward implementations, on 200 blob-masked maps of 518x518.

Not a test. It times

- cflow: the per-threshold loop of the official ``cal_pro_score`` (relabel every mask with skimage at each of
  the ~200 thresholds, docs/methods.md §1.5) against :func:`zsad.metrics.aupro_cflow`;
- exact: a plain anomalib-style computation (one arg-sort of every pixel, cumulative sums) against
  :func:`zsad.metrics.aupro_exact`;
- optionally (``--sklearn``) sklearn's pixel AUROC / AP / PR curve against
  :func:`zsad.metrics.pixel_metrics`;

checks that both give the same numbers (1e-6) and prints the speed ratios (zsad: best of 3 runs). The cflow
loop takes minutes at this size, so by default it runs on a subset of thresholds, is compared point by point
with zsad's curve there, and its time is extrapolated to all thresholds (``--full`` runs it entirely and
compares the AUPRO).

    python benchmarks/bench_aupro.py [--n 200] [--size 518] [--naive-thresholds 12] [--full] [--sklearn]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from scipy import ndimage
from skimage import measure
from sklearn import metrics as skm

from zsad import metrics as M

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed trapz


def make_data(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Blob masks (about 1/3 of images normal) and CLIP-like maps: a 37x37 grid upsampled, plus signal."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        for _ in range(rng.choice([0, 1, 2, 3], p=[0.35, 0.35, 0.2, 0.1])):
            cy, cx = rng.integers(0, size, 2)
            ry, rx = rng.uniform(4, size / 8, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    grid = rng.normal(size=(n, 37, 37)).astype(np.float32)
    noise = ndimage.zoom(grid, (1, size / 37, size / 37), order=1)
    maps = noise + 1.5 * masks
    return masks, maps.astype(np.float32)


def naive_cflow_point(masks: np.ndarray, maps: np.ndarray, th: float) -> tuple[float, float]:
    """One threshold of the official loop: relabel every mask, mean region overlap, FPR."""
    predicted = maps > th
    overlaps = []
    for mask, pred in zip(masks, predicted, strict=True):
        for region in measure.regionprops(measure.label(mask)):
            overlaps.append(pred[region.coords[:, 0], region.coords[:, 1]].sum() / region.area)
    normal = ~masks
    return float(np.logical_and(predicted, normal).sum() / normal.sum()), float(np.mean(overlaps))


def naive_cflow_value(fpr: np.ndarray, pro: np.ndarray, limit: float = 0.3) -> float:
    kept = fpr < limit
    x = fpr[kept]
    x = (x - x.min()) / (x.max() - x.min())
    return float(skm.auc(x, pro[kept]))


def naive_exact(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """Label once, arg-sort every pixel, cumulative sums, last point of each tie, cut and interpolate."""
    labels = np.stack([measure.label(m) for m in masks]).astype(np.int64)
    offsets = np.cumsum([0] + [lab.max() for lab in labels[:-1]])
    labels[labels > 0] += np.repeat(offsets, [np.count_nonzero(lab) for lab in labels])
    flat_labels, flat_maps = labels.ravel(), maps.ravel()
    n_regions = labels.max()
    size = np.bincount(flat_labels)
    normal = flat_labels == 0
    order = np.argsort(-flat_maps, kind="stable")
    fpr_steps = normal[order] / normal.sum()
    pro_steps = np.where(normal, 0.0, 1.0 / size[flat_labels])[order] / n_regions
    fpr, pro = np.cumsum(fpr_steps), np.cumsum(pro_steps)
    ranked = flat_maps[order]
    last_of_tie = np.append(ranked[:-1] != ranked[1:], True)
    fpr = np.concatenate(([0.0], np.minimum(fpr[last_of_tie], 1)))
    pro = np.concatenate(([0.0], np.minimum(pro[last_of_tie], 1)))
    i = np.flatnonzero(fpr <= limit)[-1]
    x, y = list(fpr[: i + 1]), list(pro[: i + 1])
    if fpr[i] < limit:
        x.append(limit)
        y.append(pro[i] + (pro[i + 1] - pro[i]) * (limit - fpr[i]) / (fpr[i + 1] - fpr[i]))
    return float(_trapezoid(y, x) / x[-1])


class Clock:
    """Wall and CPU seconds of a block; CPU time is the steadier figure on a shared, busy machine."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def scaled(self, factor: float) -> Clock:
        out = Clock()
        out.wall, out.cpu = self.wall * factor, self.cpu * factor
        return out

    def __str__(self) -> str:
        return f"wall {self.wall:8.2f} s, CPU {self.cpu:8.2f} s"


def best_of(repeats: int, fn, *args):
    """Result and the fastest Clock (by wall time) of several runs: the machine's load comes and goes."""
    clocks = []
    for _ in range(repeats):
        with Clock() as clock:
            out = fn(*args)
        clocks.append(clock)
    return out, min(clocks, key=lambda c: c.wall)


def ratio(slow: Clock, fast: Clock) -> str:
    return f"{slow.wall / fast.wall:.1f}x wall, {slow.cpu / fast.cpu:.1f}x CPU"


def bench_cflow(masks: np.ndarray, maps: np.ndarray, naive_thresholds: int, full: bool) -> None:
    value, fast = best_of(3, M.aupro_cflow, masks, maps)
    thresholds, fpr, pro = M.cflow_curve(masks, maps)
    picks = np.arange(thresholds.size) if full else np.linspace(0, thresholds.size - 1, naive_thresholds)
    picks = np.unique(picks.astype(int))
    with Clock() as subset:
        points = [naive_cflow_point(masks, maps, thresholds[j]) for j in picks]
    worst = max(max(abs(f - fpr[j]), abs(p - pro[j])) for (f, p), j in zip(points, picks, strict=True))
    assert worst < 1e-6, f"cflow curve differs from the naive loop by {worst}"
    print(f"cflow  zsad : {fast}  AUPRO {value:.6f} ({thresholds.size} thresholds)")
    if full:
        naive_value = naive_cflow_value(*np.asarray(points).T)
        assert abs(naive_value - value) < 1e-6, (naive_value, value)
        naive, how = subset, "measured, full loop"
        print(f"cflow  naive AUPRO {naive_value:.6f}; |difference| {abs(naive_value - value):.1e}")
    else:
        naive = subset.scaled(thresholds.size / picks.size)
        how = f"extrapolated from {picks.size} of {thresholds.size} thresholds"
    print(f"cflow  naive: {naive}  ({how}); max |FPR/PRO difference| {worst:.1e}")
    print(f"cflow  speed-up: {ratio(naive, fast)}")


def bench_exact(masks: np.ndarray, maps: np.ndarray) -> None:
    value, fast = best_of(3, M.aupro_exact, masks, maps)
    with Clock() as naive:
        naive_value = naive_exact(masks, maps)
    diff = abs(naive_value - value)
    assert diff < 1e-6, (naive_value, value)
    print(f"exact  zsad : {fast}  AUPRO {value:.6f}")
    print(f"exact  naive: {naive}  (one arg-sort); AUPRO {naive_value:.6f}; |difference| {diff:.1e}")
    print(f"exact  speed-up: {ratio(naive, fast)}")


def bench_curve_metrics(masks: np.ndarray, maps: np.ndarray) -> None:
    ours, fast = best_of(3, M.pixel_metrics, masks, maps, "exact")
    y, s = masks.ravel(), maps.ravel()
    with Clock() as slow:
        precision, recall, _ = skm.precision_recall_curve(y, s)
        f1 = 2 * precision * recall / (precision + recall)
        ref = {
            "auroc": skm.roc_auc_score(y, s),
            "ap": skm.average_precision_score(y, s),
            "f1_max": float(np.max(f1[np.isfinite(f1)])),
        }
    for key, expected in ref.items():
        assert abs(ours[key] - expected) < 1e-6, (key, ours[key], expected)
    print(f"pixel  sklearn AUROC + AP + PR curve: {slow}")
    print(f"pixel  zsad pixel_metrics (AUROC, AP, F1-max and exact AUPRO): {fast}")
    print(f"pixel  speed-up: {ratio(slow, fast)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--naive-thresholds", type=int, default=12)
    parser.add_argument("--full", action="store_true", help="run the naive cflow loop over all thresholds")
    parser.add_argument("--sklearn", action="store_true", help="also time sklearn's AUROC/AP/PR curve")
    args = parser.parse_args()
    masks, maps = make_data(args.n, args.size, args.seed)
    n_regions = sum(measure.label(m).max() for m in masks)
    print(
        f"{args.n} maps of {args.size}x{args.size} ({masks.size / 1e6:.1f}M pixels, "
        f"{masks.mean():.1%} anomalous, {n_regions} regions); "
        f"{platform.processor() or platform.machine()}, numpy {np.__version__}"
    )
    bench_cflow(masks, maps, args.naive_thresholds, args.full)
    bench_exact(masks, maps)
    if args.sklearn:
        bench_curve_metrics(masks, maps)


if __name__ == "__main__":
    main()
