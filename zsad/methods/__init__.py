"""One registry for every detector (timm-style): ``create(ID, ...)`` builds any method by its ID."""

from __future__ import annotations

from typing import Any

from zsad.methods.base import Detector
from zsad.methods.registry import available, check_options, create, get_class, option_names


def from_official(method_id: str, checkpoint=None, weights=None, image_size=None, **options: Any) -> Detector:
    """A detector set to the official code's behaviour, reading released checkpoints
    (:func:`zsad.methods.official.from_official`)."""
    from zsad.methods.official import from_official as build

    return build(method_id, checkpoint=checkpoint, weights=weights, image_size=image_size, **options)


__all__ = ["Detector", "available", "check_options", "create", "from_official", "get_class", "option_names"]
