"""Read, validate and write the ``meta.json`` index shared by the official repositories
(docs/methods.md §1.3).

The format, as written by the APRIL-GAN / AnomalyCLIP generators::

    {"train": {cls: [record, ...]}, "test": {cls: [record, ...]}}

with each record ``{"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}``. Paths are relative to
the dataset root (a few official generators, e.g. AnomalyCLIP's TN3K one, write absolute paths; joining an
absolute path to the root keeps it absolute, so those load too). ``mask_path`` is ``""`` for normal images and
for image-only datasets; ``specie_name`` is the defect-type folder (``""`` for VisA); ``anomaly`` is 0 or 1.
Extra record keys are kept. Files are written like the official ones: 4-space indent, trailing newline,
record keys in the order above.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from zsad.data.images import DataError

SPLITS: tuple[str, ...] = ("train", "test")
RECORD_KEYS: tuple[str, ...] = ("img_path", "mask_path", "cls_name", "specie_name", "anomaly")
META_NAME = "meta.json"


def make_record(
    img_path: str, mask_path: str, cls_name: str, specie_name: str, anomaly: int
) -> dict[str, Any]:
    """One meta.json record, keys in the official order."""
    return {
        "img_path": img_path,
        "mask_path": mask_path,
        "cls_name": cls_name,
        "specie_name": specie_name,
        "anomaly": int(anomaly),
    }


def _check_record(record: Any, where: str, cls: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: each record must be an object, got {type(record).__name__}")
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}; a record needs {list(RECORD_KEYS)}")
    for key in ("img_path", "mask_path", "cls_name", "specie_name"):
        if not isinstance(record[key], str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(record[key]).__name__}")
    if not record["img_path"]:
        raise DataError(f"{where}: 'img_path' is empty")
    anomaly = record["anomaly"]
    # bool is an int subclass; JSON true/false is a different, probably accidental, spelling: reject it.
    if isinstance(anomaly, bool) or not isinstance(anomaly, int) or anomaly not in (0, 1):
        raise DataError(f"{where}: 'anomaly' must be 0 or 1, got {anomaly!r}")
    if record["cls_name"] != cls:
        raise DataError(
            f"{where}: 'cls_name' is {record['cls_name']!r} but the record is listed under {cls!r}"
        )


def validate_meta(meta: Any, source: str = "meta") -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Check the structure of a meta dict and return it with both splits present.

    Args:
        meta: the parsed JSON.
        source: a name for error messages (normally the file path).

    Raises:
        DataError: naming ``source``, the split, class and record index, and what is wrong.
    """
    if not isinstance(meta, dict):
        raise DataError(
            f"{source}: top level must be an object with 'train'/'test', got {type(meta).__name__}"
        )
    unknown = sorted(set(meta) - set(SPLITS))
    if unknown:
        raise DataError(f"{source}: unknown top-level key(s) {unknown}; only {list(SPLITS)} are allowed")
    if not any(split in meta for split in SPLITS):
        raise DataError(f"{source}: no 'train' or 'test' key")
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for split in SPLITS:
        classes = meta.get(split, {})
        if not isinstance(classes, dict):
            raise DataError(
                f"{source}: '{split}' must map class names to lists, got {type(classes).__name__}"
            )
        for cls, records in classes.items():
            if not isinstance(records, list):
                raise DataError(
                    f"{source}: {split}/{cls} must be a list of records, got {type(records).__name__}"
                )
            for i, record in enumerate(records):
                _check_record(record, f"{source}: {split}/{cls}[{i}]", cls)
        out[split] = classes
    return out


def meta_file(path_or_root: str | os.PathLike) -> Path:
    """``path_or_root`` itself if it is a file path, ``<dir>/meta.json`` if it is a directory."""
    p = Path(path_or_root)
    return p / META_NAME if p.is_dir() else p


def read_meta(path_or_root: str | os.PathLike) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Load and validate a meta.json (a file path, or a dataset root containing ``meta.json``).

    Returns:
        ``{"train": {...}, "test": {...}}`` (a split absent from the file comes back empty).

    Raises:
        DataError: missing file, invalid JSON, or a structural problem (see :func:`validate_meta`).
    """
    path = meta_file(path_or_root)
    if not path.is_file():
        raise DataError(
            f"meta file not found: {path}; create it with `zsad data prepare --format <fmt> --src <root>`"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from exc
    return validate_meta(meta, str(path))


def resolve_path(root: str | os.PathLike, rel: str) -> str:
    """Absolute, normalised path of a meta path (an absolute meta path is kept, as ``os.path.join`` does)."""
    return os.path.normpath(os.path.join(os.path.abspath(root), rel))


def record_mask_path(root: str | os.PathLike, record: dict[str, Any]) -> str | None:
    """The mask to read for a record, or None for an all-zero mask.

    Normal records never read a mask (the official loaders ignore ``mask_path`` when ``anomaly == 0``), and
    an empty ``mask_path`` means "no pixel annotation" (image-only datasets).
    """
    if record["anomaly"] == 0 or not record["mask_path"]:
        return None
    return resolve_path(root, record["mask_path"])


def _ordered(record: dict[str, Any]) -> dict[str, Any]:
    extra = {k: v for k, v in record.items() if k not in RECORD_KEYS}
    return {**{k: record[k] for k in RECORD_KEYS}, **extra}


def write_meta(meta: dict[str, Any], path: str | os.PathLike) -> Path:
    """Validate ``meta`` and write it in the official layout (indent 4, trailing newline).

    Args:
        meta: ``{"train": {cls: [record]}, "test": {...}}``; class order is kept as given.
        path: the file to write, or an existing directory (then ``<dir>/meta.json``).

    Returns:
        The path written. The file is replaced atomically, so a crash never leaves half a meta.json.
    """
    target = meta_file(path)
    checked = validate_meta(meta, str(target))
    ordered = {
        split: {cls: [_ordered(r) for r in records] for cls, records in checked[split].items()}
        for split in SPLITS
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(ordered, indent=4) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def finetuning_split(
    meta: dict[str, dict[str, list[dict[str, Any]]]], cls: str, seed: int = 0
) -> tuple[dict[str, dict[str, list[dict[str, Any]]]], str]:
    """A meta with a labelled ``train`` split to fine-tune on and a disjoint ``test`` split to evaluate on,
    for class ``cls`` (docs/methods.md §12.2), and a sentence saying which rule made it.

    A target whose train split already holds defective images (TN3K's ``trainval``) keeps its own splits.
    Otherwise (MVTec-style layouts, SynthAD, Magnetic Tile: the train split is normal-only) the **test** split
    is cut into two seeded halves, per label, so each half has half of the normal and half of the defective
    images: the first becomes ``train``, the second ``test``. No image is in both.
    """
    if cls not in meta["test"]:
        raise DataError(f"class {cls!r} is not in the test split; classes: {', '.join(sorted(meta['test']))}")
    own_train = meta["train"].get(cls, [])
    if any(int(r["anomaly"]) for r in own_train):
        split = {"train": {cls: own_train}, "test": {cls: meta["test"][cls]}}
        rule = "the dataset's own train split (fine-tuning) and test split (evaluation)"
    else:
        import numpy as np

        records = meta["test"][cls]
        rng = np.random.default_rng(seed)
        halves: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
        for label in (0, 1):
            index = rng.permutation([i for i, r in enumerate(records) if int(r["anomaly"]) == label])
            halves[0].extend(records[i] for i in sorted(index[: len(index) // 2]))
            halves[1].extend(records[i] for i in sorted(index[len(index) // 2 :]))
        split = {"train": {cls: halves[0]}, "test": {cls: halves[1]}}
        rule = (
            f"the train split has no defects, so the test split is cut in two seeded halves (seed {seed}, "
            "per label): one for fine-tuning, the other for evaluation"
        )
    tune = {r["img_path"] for r in split["train"][cls]}
    if tune & {r["img_path"] for r in split["test"][cls]}:
        raise DataError(
            f"class {cls!r}: the train and test splits share images; fine-tuning would see test images"
        )
    return split, rule
