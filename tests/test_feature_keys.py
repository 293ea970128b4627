"""Feature-cache keys: an option that changes ``extract_features`` changes ``feature_key`` and one that does
not leaves it alone, for every method (a stale cache entry would otherwise serve another option's features,
e.g. across a DPAM sweep)."""

from __future__ import annotations

import functools

import pytest
import torch

from zsad import methods

# (method, base options, the changed options, whether the change alters extract_features' output)
CASES = [
    ("clip", {}, {"precision": "bf16"}, True),
    ("clip", {}, {"prompt_bank": "aprilgan"}, False),
    ("winclip", {}, {"scales": (2,)}, True),
    ("winclip", {}, {"temperature": 0.5}, False),
    ("winclip-fewshot", {}, {"patch_features": "raw"}, True),
    ("winclip-fewshot", {}, {"aggregation": "caoyunkang"}, False),
    ("aprilgan", {}, {"layers": (2, 4)}, True),
    ("aprilgan", {}, {"image_score": "official-transductive"}, False),
    ("clipad-sdp", {"rvs": "mean"}, {"num_stages": 2}, True),
    ("clipad-sdp", {"rvs": "mean"}, {"legacy_aliasing": True}, True),
    ("clipad-sdp", {"rvs": "mean"}, {"surgery": False}, False),
    ("clipad-sdp-plus", {"rvs": "mean"}, {"num_stages": 2}, True),
    ("clipad-sdp-plus", {"rvs": "mean"}, {"image_score": "max"}, False),
    ("anomalyclip", {}, {"dpam": "qq"}, True),
    ("anomalyclip", {}, {"dpam_start": 1}, True),
    ("anomalyclip", {}, {"layers": (2, 4)}, True),
    ("anomalyclip", {}, {"cls_ln_post": False}, False),
    ("anomalyclip", {}, {"lam": 0.5}, False),
    ("adaclip", {}, {"prompting": "static"}, True),
    ("adaclip", {}, {"hsf": "off"}, False),
    ("mfpclip", {}, {"sp": False}, True),
    ("mfpclip", {}, {"cnn_seed": 1}, True),
    ("mfpclip", {}, {"mp": False}, False),
]


@functools.cache
def _images(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(4))


_BASE_RUNS: dict[tuple, tuple[dict, dict]] = {}


def _run(backbone, method: str, options: dict) -> tuple[dict, dict]:
    """(feature_key, extract_features) of one detector; the base runs are shared by their cases."""
    torch.manual_seed(0)  # the same initial learned parts (MFP-CLIP's random CNN, AdaCLIP's generators)
    detector = methods.create(method, backbone=backbone, **options)
    return detector.feature_key(), detector.extract_features(_images(backbone.image_size))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a
    )


@pytest.mark.parametrize(
    ("method", "base", "change", "changes_features"),
    CASES,
    ids=[f"{m}-{next(iter(c))}={next(iter(c.values()))}" for m, _, c, _ in CASES],
)
def test_feature_key_follows_extract_features(tiny_random, method, base, change, changes_features):
    base_key = (method, tuple(sorted(base.items())))
    if base_key not in _BASE_RUNS:
        _BASE_RUNS[base_key] = _run(tiny_random, method, base)
    key_before, features_before = _BASE_RUNS[base_key]
    key_after, features_after = _run(tiny_random, method, {**base, **change})
    same_features = _same(features_before, features_after)
    assert same_features is not changes_features  # the case's claim about the option itself
    assert (key_before == key_after) is same_features
