"""Run any detector over a meta.json dataset and build the per-class table (docs/methods.md §1.5, pitfall 21).

Every metric is computed per class (pixel metrics pool all pixels of the class's test images at S x S), then
averaged without weights over classes. A class with a single label reports "n/a" (NaN), never 0.
"""

from __future__ import annotations

import json
import math
import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from zsad import metrics
from zsad.cache import FeatureCache
from zsad.device import check_workers
from zsad.methods.base import Detector

MISSING_MASKS = ("exclude", "zero-fill")
COLUMNS = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_aupro",
)


@dataclass
class EvalResult:
    """Per-class table (fractions in [0, 1], NaN for n/a), per-image scores, and optionally the maps."""

    table: pd.DataFrame
    scores: pd.DataFrame
    aupro_convention: str
    config: dict[str, Any]
    maps: dict[str, np.ndarray] = field(default_factory=dict)

    def to_markdown(self) -> str:
        """Percentages to 0.1 like the papers, "n/a" for undefined, AUPRO convention named in the header."""
        shown = self.table.rename(columns={"pixel_aupro": f"pixel_aupro ({self.aupro_convention})"})
        shown = shown.map(metrics.format_value)
        header = "| class | " + " | ".join(shown.columns) + " |"
        rule = "|" + "---|" * (len(shown.columns) + 1)
        pairs = zip(shown.index, shown.values, strict=True)
        rows = [f"| {name} | " + " | ".join(row) + " |" for name, row in pairs]
        return "\n".join([header, rule, *rows])

    def save(self, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``metrics.csv`` (per class, then ``mean``), ``metrics.md``, ``scores.csv``, ``run.json``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.table.rename_axis("class").reset_index().to_csv(
            out / "metrics.csv", index=False, float_format="%.6f", na_rep=""
        )
        (out / "metrics.md").write_text(self.to_markdown() + "\n")
        # Full precision: metrics recomputed from scores.csv must equal metrics.csv (rounding to 1e-6 made
        # near-zero scores tie and moved the image AUROC by 2 points on the embedded world).
        self.scores.to_csv(out / "scores.csv", index=False)
        run = {
            **self.config,
            "aupro_convention": self.aupro_convention,
            **(extra or {}),
            "versions": versions(),
        }
        (out / "run.json").write_text(json.dumps(run, indent=2, default=str) + "\n")
        return out


def versions() -> dict[str, str]:
    import open_clip

    import zsad

    return {
        "zsad": zsad.__version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
    }


def _collate(items: list[dict]) -> dict[str, Any]:
    return {
        "image": torch.stack([it["image"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "label": [int(it["label"]) for it in items],
        "cls_name": [it["cls_name"] for it in items],
        "path": [it["path"] for it in items],
    }


def _detector_device(detector: Detector) -> torch.device:
    """The device of a detector's backbone (the CPU for detectors without one, e.g. an ONNX graph)."""
    return getattr(getattr(detector, "backbone", None), "device", torch.device("cpu"))


def _predict_batch(detector: Detector, batch: dict[str, Any], cache: FeatureCache | None):
    # Pinned batches (CUDA) copy while the previous batch still runs.
    images = batch["image"].to(_detector_device(detector), non_blocking=True)
    class_names = batch["cls_name"]
    if cache is None or not hasattr(detector, "extract_features"):
        return detector.predict(images, class_names)
    key = detector.feature_key()
    # The disk cache holds CPU tensors; a batch's features must all be where the detector expects them.
    where = detector.features_device
    cached = [
        None if feats is None else {name: value.to(where) for name, value in feats.items()}
        for feats in (cache.get(key, path) for path in batch["path"])
    ]
    missing = [i for i, feats in enumerate(cached) if feats is None]
    if missing:
        fresh = detector.extract_features(images[missing])
        for j, i in enumerate(missing):
            cached[i] = {name: value[j] for name, value in fresh.items()}
            cache.put(key, batch["path"][i], cached[i])
    features = {name: torch.stack([c[name] for c in cached]) for name in cached[0]}
    return detector.predict_features(features, class_names)


def evaluate(
    detector: Detector,
    dataset: Dataset,
    batch_size: int = 8,
    aupro_convention: str = "cflow",
    progress: bool = True,
    keep_maps: bool = False,
    cache: FeatureCache | bool | None = None,
    max_images_per_class: int | None = None,
    missing_masks: str = "exclude",
    workers: int = 0,
) -> EvalResult:
    """Predict every test image, then compute image and pixel metrics per class and their mean.

    ``cache=True`` stores frozen features on disk (:class:`zsad.cache.FeatureCache`) for detectors that split
    ``extract_features``/``predict_features``; a second run reads them instead of running the backbone.
    ``max_images_per_class`` keeps N evenly spaced images per class (quick looks; the run config says so).

    ``missing_masks``: an anomalous image whose ``mask_path`` is empty, in a class that has pixel masks, is
    left out of that class's pixel metrics (``"exclude"``, with a warning; the count per class is in the
    config as ``pixel_excluded_images``) or scored against an all-zero mask as the official loaders do
    (``"zero-fill"``; published pixel numbers on such data depend on it). Image metrics keep every image.

    ``workers``: DataLoader processes decoding and resizing the images while the detector runs (results do
    not depend on it); batches are pinned and copied asynchronously when the detector is on CUDA.
    """
    if aupro_convention not in metrics.AUPRO_CONVENTIONS:
        raise ValueError(f"aupro_convention must be one of {metrics.AUPRO_CONVENTIONS}")
    if missing_masks not in MISSING_MASKS:
        raise ValueError(f"missing_masks must be one of {', '.join(MISSING_MASKS)}; got {missing_masks!r}")
    if max_images_per_class is not None:
        dataset = _spread_per_class(dataset, max_images_per_class)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: check the split and class filter")
    # meta.json records say which anomalous images lack a mask; other datasets say nothing: none flagged.
    records = getattr(dataset, "items", None) or [{}] * len(dataset)
    unmasked = iter([int(r.get("anomaly", 0)) == 1 and r.get("mask_path") == "" for r in records])
    feature_cache = FeatureCache() if cache is True else (cache or None)
    check_workers(workers)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=_collate,
        num_workers=workers,
        pin_memory=_detector_device(detector).type == "cuda",
    )
    per_class: dict[str, dict[str, list]] = {}
    rows = []
    maps_out: dict[str, np.ndarray] = {}
    desc = f"{getattr(detector, 'method_id', 'detector')} eval"
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, disable=not progress):
            scores, maps = _predict_batch(detector, batch, feature_cache)
            scores, maps = scores.float().cpu().numpy(), maps.float().cpu().numpy()
            # Score components a detector exposes for transductive post-processing (CLIP-AD's minmax-sum).
            parts = {k: v.float().cpu().numpy() for k, v in getattr(detector, "last_score_parts", {}).items()}
            for i, cls in enumerate(batch["cls_name"]):
                acc = per_class.setdefault(
                    cls, {"labels": [], "scores": [], "masks": [], "maps": [], "unmasked": []}
                )
                acc["unmasked"].append(next(unmasked))
                acc["labels"].append(batch["label"][i])
                acc["scores"].append(float(scores[i]))
                acc["masks"].append(batch["mask"][i].numpy() > 0.5)
                acc["maps"].append(maps[i])
                rows.append(
                    {
                        "path": batch["path"][i],
                        "cls_name": cls,
                        "label": batch["label"][i],
                        "score": float(scores[i]),
                        **{k: float(v[i]) for k, v in parts.items()},
                    }
                )
                if keep_maps:
                    maps_out[batch["path"][i]] = maps[i]
    scores_df = pd.DataFrame(rows)
    if hasattr(detector, "finalize_scores"):
        scores_df = detector.finalize_scores(scores_df)
        for cls, acc in per_class.items():
            acc["scores"] = scores_df.loc[scores_df.cls_name == cls, "score"].tolist()
    excluded = _exclude_unmasked(per_class) if missing_masks == "exclude" else {}
    table = metrics_table(per_class, aupro_convention)
    config = detector.config() if hasattr(detector, "config") else {}
    config["missing_masks"] = missing_masks
    config["pixel_excluded_images"] = excluded
    if max_images_per_class is not None:
        config["max_images_per_class"] = max_images_per_class
    return EvalResult(table, scores_df, aupro_convention, config, maps_out)


def _exclude_unmasked(per_class: dict[str, dict[str, list]]) -> dict[str, int]:
    """Drop anomalous images without a mask from the pixel lists of classes that have pixel masks (an
    all-zero mask would count their defect pixels as normal); returns {class: images left out}."""
    excluded = {}
    for cls, acc in per_class.items():
        flags = acc.pop("unmasked")
        if not any(flags) or not any(mask.any() for mask in acc["masks"]):
            continue  # nothing missing, or an image-only class: pixel metrics are n/a anyway
        acc["masks"] = [m for m, gone in zip(acc["masks"], flags, strict=True) if not gone]
        acc["maps"] = [m for m, gone in zip(acc["maps"], flags, strict=True) if not gone]
        excluded[cls] = sum(flags)
    if excluded:
        counts = ", ".join(f"{cls}: {n}" for cls, n in sorted(excluded.items()))
        warnings.warn(
            f"anomalous test images without a mask_path are left out of the pixel metrics ({counts}); "
            "missing_masks='zero-fill' (--missing-masks zero-fill) scores them against empty masks instead",
            stacklevel=3,
        )
    return excluded


def metrics_table(per_class: dict[str, dict[str, list]], aupro_convention: str = "cflow") -> pd.DataFrame:
    """Rows: classes (sorted) then ``mean`` (unweighted over classes, NaN-aware); columns: :data:`COLUMNS`."""
    records = {}
    for cls in sorted(per_class):
        acc = per_class[cls]
        image = metrics.image_metrics(np.asarray(acc["labels"]), np.asarray(acc["scores"]))
        masks = np.stack(acc["masks"])
        if masks.any():
            pixel = metrics.pixel_metrics(masks, np.stack(acc["maps"]), aupro_convention=aupro_convention)
        else:
            # Image-only datasets (and classes with no annotated defect) have no pixel ground truth.
            pixel = {"auroc": math.nan, "ap": math.nan, "f1_max": math.nan, "aupro": math.nan}
        records[cls] = {
            **{f"image_{k}": image[k] for k in ("auroc", "ap", "f1_max")},
            **{f"pixel_{k}": pixel[k] for k in ("auroc", "ap", "f1_max", "aupro")},
        }
    records["mean"] = metrics.summarize(records)
    return pd.DataFrame.from_dict(records, orient="index")[list(COLUMNS)]


def _spread_per_class(dataset: Dataset, n: int) -> Subset:
    """At most ``n`` items per class, evenly spaced through the class's items (defect types stay mixed)."""
    by_class: dict[str, list[int]] = {}
    for i, item in enumerate(dataset.items):
        by_class.setdefault(item["cls_name"], []).append(i)
    indices = sorted(
        idx[k]
        for idx in by_class.values()
        for k in np.unique(np.linspace(0, len(idx) - 1, min(n, len(idx))).round().astype(int))
    )
    subset = Subset(dataset, indices)
    subset.items = [dataset.items[i] for i in indices]
    return subset


def fit_few_shot(
    detector: Detector, train_dataset: Dataset, k: int, seed: int = 0, classes: list[str] | None = None
) -> list[str]:
    """Give ``k`` normal reference images per class (drawn with ``seed`` from the train split) to a detector.

    Returns the reference image paths, so reports can list exactly which shots were used.
    """
    if k < 1:
        raise ValueError(f"k-shot needs k >= 1, got {k}")
    rng = np.random.default_rng(seed)
    used = []
    for cls in classes or sorted({it["cls_name"] for it in train_dataset.items}):
        normal = [
            i for i, it in enumerate(train_dataset.items) if it["cls_name"] == cls and int(it["anomaly"]) == 0
        ]
        if len(normal) < k:
            raise ValueError(f"class {cls!r} has {len(normal)} normal training images; {k}-shot needs {k}")
        picked = sorted(rng.choice(normal, size=k, replace=False).tolist())
        images = torch.stack([train_dataset[i]["image"] for i in picked])
        detector.fit_few_shot(images, [cls] * k)
        used += [train_dataset[i]["path"] for i in picked]
    return used


def sweep(
    detectors: dict[Any, Detector],
    dataset: Dataset,
    metrics_shown: tuple[str, ...] = ("image_auroc", "pixel_auroc", "pixel_aupro"),
    index_name: str = "setting",
    **evaluate_options: Any,
) -> tuple[pd.DataFrame, dict[Any, EvalResult]]:
    """Evaluate one detector per setting on the same dataset: (class-mean table indexed by setting, results).

    Ablation notebooks change one thing at a time; ``evaluate_options`` (e.g. ``cache=True``) apply to all.
    """
    results = {name: evaluate(detector, dataset, **evaluate_options) for name, detector in detectors.items()}
    table = pd.DataFrame({name: r.table.loc["mean", list(metrics_shown)] for name, r in results.items()}).T
    return table.rename_axis(index_name), results
