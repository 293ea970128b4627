"""SynthAD written to disk in the MVTec layout, with the official meta.json; :func:`ensure` caches it."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from zsad.data.synth.catalogue import CATEGORIES, DEFECTS, SYNTH_VERSION, _check_size, _resolve_categories
from zsad.data.synth.render import render

_SPLIT_TRAIN, _SPLIT_TEST_GOOD, _SPLIT_TEST_DEFECT = 0, 1, 2
CONFIG_NAME = "synthad.json"


def image_seed(seed: int, category: str, split: int, defect_index: int, index: int) -> list[int]:
    """The seed sequence of one dataset image: independent of which other categories are generated."""
    return [seed, CATEGORIES.index(category), split, defect_index, index]


def _config(seed, categories, n_train, n_test_good, n_test_per_defect, size) -> dict[str, Any]:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    for name, value in (
        ("n_train", n_train),
        ("n_test_good", n_test_good),
        ("n_test_per_defect", n_test_per_defect),
    ):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    _check_size(size)
    return {
        "generator": "zsad.data.synth",
        "version": SYNTH_VERSION,
        "seed": int(seed),
        "categories": list(_resolve_categories(categories)),
        "defects": list(DEFECTS),
        "n_train": int(n_train),
        "n_test_good": int(n_test_good),
        "n_test_per_defect": int(n_test_per_defect),
        "size": int(size),
    }


def _read_config(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # PNG is lossless whatever the level; 3 halves the time of the default 6 for ~5 % larger files.
    Image.fromarray(array).save(path, compress_level=3)


def _file_name(index: int, count: int) -> str:
    return f"{index:0{max(3, len(str(count - 1)))}d}"


def generate(
    out_dir: str | os.PathLike,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    n_train: int = 16,
    n_test_good: int = 12,
    n_test_per_defect: int = 3,
    size: int = 224,
    progress: bool = False,
) -> Path:
    """Write SynthAD in the MVTec layout with the official ``meta.json`` (docs/methods.md §1.3).

    ``<cat>/train/good/000.png``, ``<cat>/test/good/000.png``, ``<cat>/test/<defect>/000.png`` and
    ``<cat>/ground_truth/<defect>/000_mask.png`` (0/255, mode L), then ``meta.json`` (paths relative to
    ``out_dir``) and, last, ``synthad.json`` with the arguments, which :func:`ensure` compares. Train and
    test images come from the same distribution; only their seeds (:func:`image_seed`) differ.

    Returns:
        ``out_dir`` as a Path.
    """
    from zsad.data.meta import make_record, write_meta

    config = _config(seed, categories, n_train, n_test_good, n_test_per_defect, size)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    ours = _read_config(root) is not None
    (root / CONFIG_NAME).unlink(missing_ok=True)  # an interrupted run must not look complete
    meta: dict[str, dict[str, list[dict[str, Any]]]] = {"train": {}, "test": {}}
    cats = config["categories"]
    iterator = cats
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(cats, desc="SynthAD", unit="category")
    for cat in iterator:
        if ours:  # drop files of a previous, possibly larger, SynthAD run so meta.json and disk agree
            for sub in ("train", "test", "ground_truth"):
                shutil.rmtree(root / cat / sub, ignore_errors=True)
        meta["train"][cat] = []
        for i in range(n_train):
            rng = np.random.default_rng(image_seed(seed, cat, _SPLIT_TRAIN, 0, i))
            rel = f"{cat}/train/good/{_file_name(i, n_train)}.png"
            _save_png(render(cat, rng, size)[0], root / rel)
            meta["train"][cat].append(make_record(rel, "", cat, "good", 0))
        meta["test"][cat] = []
        for i in range(n_test_good):
            rng = np.random.default_rng(image_seed(seed, cat, _SPLIT_TEST_GOOD, 0, i))
            rel = f"{cat}/test/good/{_file_name(i, n_test_good)}.png"
            _save_png(render(cat, rng, size)[0], root / rel)
            meta["test"][cat].append(make_record(rel, "", cat, "good", 0))
        for d, defect in enumerate(DEFECTS):
            for i in range(n_test_per_defect):
                rng = np.random.default_rng(image_seed(seed, cat, _SPLIT_TEST_DEFECT, d, i))
                image, mask, _ = render(cat, rng, size, defect)
                stem = _file_name(i, n_test_per_defect)
                rel = f"{cat}/test/{defect}/{stem}.png"
                rel_mask = f"{cat}/ground_truth/{defect}/{stem}_mask.png"
                _save_png(image, root / rel)
                _save_png(mask.astype(np.uint8) * 255, root / rel_mask)
                meta["test"][cat].append(make_record(rel, rel_mask, cat, defect, 1))
    write_meta(meta, root / "meta.json")
    (root / CONFIG_NAME).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    return root


def ensure(
    out_dir: str | os.PathLike,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    n_train: int = 16,
    n_test_good: int = 12,
    n_test_per_defect: int = 3,
    size: int = 224,
    progress: bool = False,
) -> Path:
    """:func:`generate` unless ``out_dir`` already holds a complete tree made with the same arguments."""
    config = _config(seed, categories, n_train, n_test_good, n_test_per_defect, size)
    root = Path(out_dir)
    if _read_config(root) == config and (root / "meta.json").is_file():
        return root
    return generate(root, seed, categories, n_train, n_test_good, n_test_per_defect, size, progress)
