"""Dataset ingestion: meta.json index, dataset preparation from original layouts, robust decoding, and the
torch Dataset (docs/methods.md §1.1, §1.3).

Names that need torch (``load_dataset``, ``AnomalyDataset``) are imported on first use, so
``zsad data prepare`` and meta.json tools start without loading torch. The synthetic dataset generator lives
in :mod:`zsad.data.synth` and is imported explicitly by whoever needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zsad.data.images import OPENAI_MEAN, OPENAI_STD, DataError, denormalize, load_image, load_mask, load_pair
from zsad.data.meta import make_record, read_meta, validate_meta, write_meta
from zsad.data.prepare import FORMATS, prepare_dataset

if TYPE_CHECKING:
    from zsad.data.dataset import AnomalyDataset, load_dataset

_LAZY = {"AnomalyDataset", "load_dataset"}

__all__ = [
    "FORMATS",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "AnomalyDataset",
    "DataError",
    "denormalize",
    "load_dataset",
    "load_image",
    "load_mask",
    "load_pair",
    "make_record",
    "prepare_dataset",
    "read_meta",
    "validate_meta",
    "write_meta",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from zsad.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'zsad.data' has no attribute {name!r}")
