"""From scores to decisions: per-class thresholds, normalised scores and binary masks (``zsad calibrate``).

Two rules, both per class with a ``global`` entry (all classes pooled) for classes without calibration data:

- ``normal-quantile``: normal images only (by default the train split's); the image threshold is the
  ``quantile`` (0.99 by default) of their image scores, the pixel threshold the same quantile of all their
  pixel values (numpy's linear quantile).
- ``f1-max``: a labelled validation set that is *not* the evaluated test set; the image (pixel) threshold is
  the score at which F1 of ``score >= threshold`` is largest (the F1-max of docs/methods.md §1.5, whose
  threshold the evaluator does not keep). A class without anomalous images falls back to ``normal-quantile``
  with a warning; a class without normal images is an error. anomalib's fallback there (the minimum score, its
  issues 2433 and 3357) would call every image anomalous, so it is never used.

The normalised score is anomalib's min-max normalisation: ``(x - threshold) / (max - min) + 0.5`` clipped
to [0, 1], with ``min``/``max`` taken over the calibration data. It is 0.5 at the threshold and monotone in
the raw score, so ``normalised >= 0.5`` and ``label == 1`` say the same thing.

A detector's image label is ``score >= image threshold``; its binary mask is ``map >= pixel threshold``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zsad.device import check_workers

FORMAT = "zsad-thresholds"
RULES = ("normal-quantile", "f1-max")
GLOBAL = "global"


def f1_max_threshold(labels: Any, scores: Any) -> float:
    """The threshold ``t`` whose decision ``score >= t`` has the largest F1 (ties: the largest ``t``).

    Candidates are the distinct scores (every other ``t`` gives the same decisions as the next score above
    it). Needs both labels; counts go from the highest score down, like :func:`zsad.metrics.f1_max`.
    """
    positive = np.asarray(labels).ravel().astype(bool)
    values = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(positive.sum())
    if n_pos == 0 or n_pos == positive.size:
        raise ValueError("F1-max needs both normal and anomalous samples")
    distinct, group = np.unique(values, return_inverse=True)
    # positives / all samples at each distinct value, accumulated from the top: counts of "score >= value".
    tps = np.cumsum(np.bincount(group, weights=positive, minlength=distinct.size)[::-1])[::-1]
    predicted = np.cumsum(np.bincount(group, minlength=distinct.size)[::-1])[::-1]
    f1 = 2.0 * tps / (predicted + n_pos)
    best = np.flatnonzero(f1 == f1.max())[-1]  # the highest threshold among equal F1
    return float(distinct[best])


def quantile_threshold(values: Any, quantile: float) -> float:
    """``numpy.quantile(values, quantile)`` (linear interpolation) of normal samples' scores."""
    return float(np.quantile(np.asarray(values, dtype=np.float64).ravel(), quantile))


def check_quantile(quantile: float) -> float:
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"--quantile must be in (0, 1]; got {quantile}")
    return float(quantile)


@dataclass
class Level:
    """One threshold with the min/max of the calibration values it normalises with."""

    threshold: float
    min: float
    max: float

    def normalize(self, values: Any) -> np.ndarray:
        """anomalib's min-max normalisation around the threshold: 0.5 at it, clipped to [0, 1]."""
        span = self.max - self.min
        span = span if span > 0 else 1.0  # calibration values that are all equal: keep 0.5 at the threshold
        return np.clip((np.asarray(values, dtype=np.float64) - self.threshold) / span + 0.5, 0.0, 1.0)


@dataclass
class Entry:
    """A class's (or the global) thresholds, the rule that produced them and the counts behind them."""

    rule: str
    image: Level
    pixel: Level | None
    counts: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "counts": self.counts,
            "image": vars(self.image),
            "pixel": vars(self.pixel) if self.pixel is not None else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        pixel = data.get("pixel")
        return cls(data["rule"], Level(**data["image"]), Level(**pixel) if pixel else None, data["counts"])


@dataclass
class Thresholds:
    """Per-class entries plus ``global``; what ``thresholds.json`` holds."""

    rule: str
    quantile: float
    classes: dict[str, Entry]
    global_entry: Entry
    data: dict[str, Any] = field(default_factory=dict)
    detector: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    source: str = "thresholds"  # the file it was read from, for messages

    def entry(self, class_name: str) -> Entry:
        """The class's entry, or the global one for a class that had no calibration data."""
        return self.classes.get(class_name, self.global_entry)

    def decide(self, score: float, class_name: str) -> tuple[float, int]:
        """(normalised score, label) of one image score."""
        level = self.entry(class_name).image
        return float(level.normalize(score)), int(score >= level.threshold)

    def mask(self, anomaly_map: np.ndarray, class_name: str) -> np.ndarray | None:
        """Binary mask ``map >= pixel threshold`` (None when no pixel threshold was calibrated)."""
        level = self.entry(class_name).pixel
        return None if level is None else np.asarray(anomaly_map) >= level.threshold

    def check_detector(self, config: dict[str, Any], source: str | Path) -> None:
        """Refuse thresholds calibrated for another method, backbone or image size (scores differ)."""
        for key in ("method", "backbone", "image_size"):
            want, have = self.detector.get(key), config.get(key)
            if want is not None and have is not None and want != have:
                raise ValueError(
                    f"{source}: thresholds were calibrated for {key}={want!r}, not {have!r}; "
                    "calibrate this detector with `zsad calibrate`"
                )

    def to_json(self) -> dict[str, Any]:
        import zsad

        return {
            "format": FORMAT,
            "zsad_version": zsad.__version__,
            "rule": self.rule,
            "quantile": self.quantile,
            "data": self.data,
            "detector": self.detector,
            "warnings": self.warnings,
            "global": self.global_entry.to_json(),
            "classes": {name: entry.to_json() for name, entry in sorted(self.classes.items())},
        }

    def save(self, path: str | Path) -> Path:
        """Write JSON through a temporary file in the same folder, then rename (never half-written)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")
        return path


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(temporary path)`` with a temporary file beside ``path``, then rename it to ``path``.

    A crash or error leaves the old file (or none), never a truncated one. The temporary name keeps the
    suffix so that writers that pick the format from it (PIL, numpy) still work.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_thresholds(path: str | Path) -> Thresholds:
    """Read ``thresholds.json``; a missing, unreadable or foreign file is one ValueError naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / "thresholds.json"
    if not path.is_file():
        raise ValueError(f"{path}: no such thresholds file (write one with `zsad calibrate --out DIR`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a zsad thresholds file ({type(err).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f'{path}: not a zsad thresholds file (no "format": "{FORMAT}")')
    try:
        return Thresholds(
            rule=data["rule"],
            quantile=data["quantile"],
            classes={name: Entry.from_json(e) for name, e in data["classes"].items()},
            global_entry=Entry.from_json(data["global"]),
            data=data.get("data", {}),
            detector=data.get("detector", {}),
            warnings=data.get("warnings", []),
        )
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: damaged thresholds file (missing {err})") from None


@dataclass
class _Collected:
    labels: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)

    def extend(self, other: _Collected) -> None:
        for name in ("labels", "scores", "maps", "masks"):
            getattr(self, name).extend(getattr(other, name))


def collect(
    detector: Any,
    dataset: Any,
    batch_size: int = 8,
    exclude: Iterable[str] = (),
    normal_only: bool = False,
    progress: bool = True,
    workers: int = 0,
) -> dict[str, _Collected]:
    """Per class: labels, per-image scores, maps and masks of ``detector.predict`` (what ``zsad predict``
    returns: no transductive per-test-set step) for every item not in ``exclude`` (few-shot references),
    normal items only with ``normal_only``. ``workers``: DataLoader processes decoding the images (the
    results do not depend on it)."""
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    check_workers(workers)
    skip = {str(p) for p in exclude}
    keep = [i for i, item in enumerate(dataset.items) if not (normal_only and int(item["anomaly"]))]
    out: dict[str, _Collected] = {}
    loader = DataLoader(Subset(dataset, keep), batch_size=batch_size, collate_fn=list, num_workers=workers)
    with torch.inference_mode():
        for batch in tqdm(loader, desc="calibrate", disable=not progress):
            items = [it for it in batch if str(it["path"]) not in skip]
            if not items:
                continue
            scores, maps = detector.predict(
                torch.stack([it["image"] for it in items]), [it["cls_name"] for it in items]
            )
            scores, maps = scores.float().cpu().numpy(), maps.float().cpu().numpy()
            for j, it in enumerate(items):
                acc = out.setdefault(it["cls_name"], _Collected())
                acc.labels.append(int(it["label"]))
                acc.scores.append(float(scores[j]))
                acc.maps.append(maps[j])
                acc.masks.append(it["mask"].numpy() > 0.5)
    return out


def _warn(message: str, warnings: list[str]) -> None:
    warnings.append(message)
    print(f"zsad: warning: {message}", file=sys.stderr)


def _entry(name: str, acc: _Collected, rule: str, quantile: float, warnings: list[str]) -> Entry:
    labels = np.asarray(acc.labels, dtype=bool)
    scores = np.asarray(acc.scores, dtype=np.float64)
    maps, masks = np.stack(acc.maps), np.stack(acc.masks)
    n_anomalous = int(labels.sum())
    n_normal = labels.size - n_anomalous
    counts = {"images": int(labels.size), "normal": n_normal, "anomalous": n_anomalous}
    if n_normal == 0:
        raise ValueError(
            f"class {name!r} has no normal calibration image: a threshold from anomalies alone would be "
            "their minimum score (every image anomalous); add normal images or use --normal-only"
        )
    used = rule
    if rule == "f1-max" and n_anomalous == 0:
        _warn(f"class {name!r} has no anomalous calibration image; using the normal-only rule", warnings)
        used = "normal-quantile"
    if used == "normal-quantile":
        # Only normal images define the rule, and so the min/max of the normalisation.
        scores, maps, labels, masks = scores[~labels], maps[~labels], labels[~labels], masks[~labels]
        image = quantile_threshold(scores, quantile)
        pixel = quantile_threshold(maps, quantile)
    else:
        image = f1_max_threshold(labels, scores)
        counts["anomalous_pixels"] = int(masks.sum())
        if masks.any():
            pixel = f1_max_threshold(masks, maps)
        else:
            _warn(
                f"class {name!r} has no annotated defect pixel; its pixel threshold is normal-only", warnings
            )
            pixel = quantile_threshold(maps[~labels], quantile)
    return Entry(
        used,
        Level(image, float(scores.min()), float(scores.max())),
        Level(pixel, float(maps.min()), float(maps.max())),
        counts,
    )


def calibrate_collected(
    collected: dict[str, _Collected], rule: str = "normal-quantile", quantile: float = 0.99
) -> Thresholds:
    """Thresholds from per-class collections (see :func:`collect`); ``global`` pools every class."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")
    quantile = check_quantile(quantile)
    if not collected:
        raise ValueError("no calibration image (check the split and the class filter)")
    warnings: list[str] = []
    if rule == "f1-max" and not any(any(acc.labels) for acc in collected.values()):
        _warn("the validation set has no anomalous image; using the normal-only rule", warnings)
        rule = "normal-quantile"
    pooled = _Collected()
    for acc in collected.values():
        pooled.extend(acc)
    classes = {name: _entry(name, acc, rule, quantile, warnings) for name, acc in sorted(collected.items())}
    return Thresholds(
        rule, quantile, classes, _entry(GLOBAL, pooled, rule, quantile, warnings), warnings=warnings
    )


def calibrate(
    detector: Any,
    dataset: Any,
    rule: str = "normal-quantile",
    quantile: float = 0.99,
    batch_size: int = 8,
    exclude: Sequence[str] = (),
    progress: bool = True,
    workers: int = 0,
) -> Thresholds:
    """Thresholds of ``detector`` on ``dataset`` (normal items only for ``normal-quantile``)."""
    collected = collect(
        detector,
        dataset,
        batch_size=batch_size,
        exclude=exclude,
        normal_only=rule == "normal-quantile",
        progress=progress,
        workers=workers,
    )
    thresholds = calibrate_collected(collected, rule, quantile)
    config = detector.config() if hasattr(detector, "config") else {}
    thresholds.detector = {k: config.get(k) for k in ("method", "backbone", "weights", "image_size")}
    return thresholds
