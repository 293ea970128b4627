"""The torch Dataset over a meta.json root, with the preprocessing every official repo shares.

docs/methods.md §1.1: images are resized to (S, S) with bicubic interpolation (the center crop that follows is
a no-op) and normalised with the OpenAI CLIP mean/std; masks are resized with bilinear interpolation and
thresholded at 0.5 (``mask_interpolation="nearest"`` gives caoyunkang/WinClip's variant). Thin defects can
vanish under bilinear+0.5 (docs/methods.md pitfall 9), so the choice is a named option. Both resizes go
through PIL exactly as torchvision's ``Resize`` does on PIL images, so tensors match the official pipelines.

Normal images get an all-zero mask of the image's own (H, W) (the official loaders transpose it,
docs/methods.md §1.3), and so do anomalous records whose ``mask_path`` is empty or an empty directory
(image-only datasets, docs/methods.md pitfall 22); :meth:`AnomalyDataset.has_masks` tells the evaluator
whether pixel metrics are defined for a class.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from zsad.data.images import OPENAI_MEAN, OPENAI_STD, DataError, is_image_file, load_pair, load_pair_mask
from zsad.data.meta import SPLITS, meta_file, read_meta, record_mask_path, resolve_path

MASK_INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}


def _has_pixel_mask(root: Path, record: dict[str, Any]) -> bool:
    path = record_mask_path(root, record)
    if path is None:
        return False
    return not os.path.isdir(path) or any(is_image_file(f) for f in Path(path).iterdir())


def preprocess_image(image: Image.Image, size: int) -> torch.Tensor:
    """Bicubic resize to (size, size), scale to [0, 1], normalise with the OpenAI mean/std -> (3, S, S)."""
    resized = image.resize((size, size), Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)
    return (arr - mean) / std


def preprocess_mask(mask: np.ndarray, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize a boolean mask to (size, size) as a 0/255 image, then threshold at 0.5 -> float {0, 1}."""
    if interpolation not in MASK_INTERPOLATIONS:
        raise ValueError(
            f"mask_interpolation must be one of {sorted(MASK_INTERPOLATIONS)}, got {interpolation!r}"
        )
    im = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    resized = np.asarray(im.resize((size, size), MASK_INTERPOLATIONS[interpolation]))
    # value / 255 > 0.5  <=>  value > 127.5  <=>  value > 127 for uint8
    return torch.from_numpy((resized > 127).astype(np.float32))


class AnomalyDataset(Dataset):
    """Items of one split of a meta.json dataset, preprocessed for a CLIP backbone.

    Each item is a dict: ``image`` (3, S, S) float, ``mask`` (S, S) float in {0, 1}, ``label`` int,
    ``cls_name``, ``specie_name`` and ``path`` (absolute image path). Items are ordered by sorted class name,
    then in meta.json order within a class.

    Attributes:
        root: dataset root (absolute). image_size: S. classes: sorted class names.
        items: the meta records kept, in item order. skipped: ``(image path, reason)`` of dropped records.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "test",
        image_size: int = 336,
        classes: str | list[str] | None = None,
        mask_interpolation: str = "bilinear",
        skip_bad: bool = False,
        *,
        meta: str | os.PathLike | None = None,
        progress: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if mask_interpolation not in MASK_INTERPOLATIONS:
            raise ValueError(
                f"mask_interpolation must be one of {sorted(MASK_INTERPOLATIONS)}, got {mask_interpolation!r}"
            )
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise DataError(f"dataset root not found or not a directory: {self.root}")
        self.meta_path = meta_file(meta if meta is not None else self.root)
        self.split = split
        self.image_size = image_size
        self.mask_interpolation = mask_interpolation
        self.skipped: list[tuple[str, str]] = []

        records = self._select(read_meta(self.meta_path)[split], classes)
        self.items = self._validate(records, skip_bad, progress)
        self.classes = sorted({r["cls_name"] for r in self.items})

    def _select(
        self, by_class: dict[str, list[dict[str, Any]]], classes: str | list[str] | None
    ) -> list[dict]:
        available = sorted(by_class)
        wanted = available if classes is None else ([classes] if isinstance(classes, str) else list(classes))
        unknown = [c for c in wanted if c not in by_class]
        if unknown:
            raise DataError(
                f"{self.meta_path}: class(es) {unknown} not in split '{self.split}'; have {available}"
            )
        records = [dict(r) for cls in sorted(set(wanted)) for r in by_class[cls]]
        if not records:
            raise DataError(
                f"{self.meta_path}: split '{self.split}' has no items for classes {sorted(wanted)}"
            )
        return records

    def _validate(self, records: list[dict], skip_bad: bool, progress: bool) -> list[dict]:
        """Existence check always (cheap); with ``skip_bad`` a full decode of every pair, done once here so
        the index never shifts during an epoch."""
        if not skip_bad:
            missing = [
                p
                for r in records
                for p in (resolve_path(self.root, r["img_path"]), record_mask_path(self.root, r))
                if p is not None and not os.path.exists(p)
            ]
            if missing:
                shown = "\n  ".join(missing[:10])
                raise DataError(
                    f"{self.meta_path}: {len(missing)} file(s) listed but missing, e.g.\n  {shown}\n"
                    "(`zsad eval --skip-bad`, skip_bad=True in Python, leaves them out with a warning)"
                )
            return records
        kept = []
        loop = records
        if progress:
            from tqdm.auto import tqdm

            loop = tqdm(records, desc="checking images", unit="img")
        for r in loop:
            try:
                load_pair(resolve_path(self.root, r["img_path"]), record_mask_path(self.root, r))
            except DataError as exc:
                self.skipped.append((resolve_path(self.root, r["img_path"]), str(exc)))
                continue
            kept.append(r)
        if self.skipped:
            warnings.warn(
                f"{self.meta_path}: skipped {len(self.skipped)} of {len(records)} unreadable item(s); "
                "see the dataset's .skipped for the list",
                stacklevel=3,
            )
        if not kept:
            raise DataError(
                f"{self.meta_path}: all {len(records)} item(s) of split '{self.split}' are unreadable"
            )
        return kept

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.items[index]
        path = resolve_path(self.root, record["img_path"])
        image, mask = load_pair(path, record_mask_path(self.root, record))
        return {
            "image": preprocess_image(image, self.image_size),
            "mask": preprocess_mask(mask, self.image_size, self.mask_interpolation),
            "label": int(record["anomaly"]),
            "cls_name": record["cls_name"],
            "specie_name": record["specie_name"],
            "path": path,
        }

    def mask(self, index: int) -> torch.Tensor:
        """``self[index]["mask"]`` without decoding the image (training epochs on cached features)."""
        record = self.items[index]
        path = resolve_path(self.root, record["img_path"])
        mask = load_pair_mask(path, record_mask_path(self.root, record))
        return preprocess_mask(mask, self.image_size, self.mask_interpolation)

    def class_indices(self, cls: str) -> list[int]:
        """Indices of the items of class ``cls`` (DataError for a class not in this dataset)."""
        if cls not in self.classes:
            raise DataError(f"class {cls!r} not in this dataset; have {self.classes}")
        return [i for i, r in enumerate(self.items) if r["cls_name"] == cls]

    def has_masks(self, cls: str | None = None) -> bool:
        """True when some anomalous item (of ``cls``, or of any class) has a pixel annotation.

        False for image-only datasets (HeadCT, BrainMRI, ...), where pixel metrics are undefined
        (docs/methods.md pitfall 22).
        """
        return any(_has_pixel_mask(self.root, r) for r in self.items if cls is None or r["cls_name"] == cls)


def load_dataset(
    root: str | os.PathLike,
    split: str = "test",
    image_size: int = 336,
    classes: str | list[str] | None = None,
    mask_interpolation: str = "bilinear",
    skip_bad: bool = False,
    *,
    meta: str | os.PathLike | None = None,
    progress: bool = False,
) -> AnomalyDataset:
    """Open one split of the dataset indexed by ``root/meta.json`` (or by ``meta``, paths still relative
    to ``root``: useful when the data folder is read-only).

    Args:
        root: dataset root; meta paths are relative to it.
        split: "train" or "test".
        image_size: S, the side of the square model input (docs/methods.md §1.1).
        classes: keep only these classes (a name or a list); default all.
        mask_interpolation: "bilinear" (+0.5 threshold, the official default) or "nearest"
        (docs/methods.md pitfall 9).
        skip_bad: decode every pair up front and drop unreadable ones with a warning (listed in
            ``.skipped``); otherwise missing files raise at construction and corrupt ones at access.
        meta: a meta.json elsewhere than ``root/meta.json``.
        progress: show a progress bar while ``skip_bad`` checks files.

    Raises:
        DataError: missing root/meta, bad meta structure, unknown classes, missing files, empty selection.
    """
    return AnomalyDataset(
        root,
        split=split,
        image_size=image_size,
        classes=classes,
        mask_interpolation=mask_interpolation,
        skip_bad=skip_bad,
        meta=meta,
        progress=progress,
    )
