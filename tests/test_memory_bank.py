"""Few-shot memory bank (zsad/methods/memory_bank.py) against brute-force loops (docs/methods.md §3.3)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from zsad.methods.memory_bank import (
    FewShotError,
    MemoryBank,
    PatchMemory,
    nearest_cosine_distance,
    upsample_sum,
)


def _brute_force_min_distance(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """min over memory rows of 1 - cos, one pair at a time, in float64."""
    out = torch.empty(queries.shape[0], dtype=torch.float64)
    for i, q in enumerate(queries.double()):
        best = math.inf
        for m in memory.double():
            cos = float(q @ m) / (float(q.norm()) * float(m.norm()))
            best = min(best, 1.0 - cos)
        out[i] = best
    return out


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_nearest_distance_matches_brute_force_across_chunks():
    queries = torch.randn(2, 7, 5, generator=_gen(0))
    memory = torch.randn(11, 5, generator=_gen(1)) * 3.0  # un-normalised on purpose
    expected = torch.stack([_brute_force_min_distance(q, memory) for q in queries])
    for chunk in (1, 3, 4096):
        got = nearest_cosine_distance(queries, memory, chunk_size=chunk)
        assert got.shape == (2, 7) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)


def test_nearest_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="non-empty"):
        nearest_cosine_distance(torch.randn(3, 4), torch.randn(0, 4))
    with pytest.raises(ValueError, match="feature sizes differ"):
        nearest_cosine_distance(torch.randn(3, 4), torch.randn(2, 5))


def test_bank_pools_images_and_positions_per_class_and_keeps_classes_apart():
    bank = MemoryBank(chunk_size=5)
    a = torch.randn(3, 4, 6, generator=_gen(2))  # 3 images, 4 tokens each
    names = ["nut", "wood", "nut"]
    bank.add(names, {"layer": a})
    assert bank.classes == ["nut", "wood"]
    assert bank.memory("nut", "layer").shape == (8, 6)
    # A second call appends to the class's memory.
    extra = torch.randn(1, 4, 6, generator=_gen(3))
    bank.add(["wood"], {"layer": extra})
    assert bank.memory("wood", "layer").shape == (8, 6)

    queries = torch.randn(3, 5, 6, generator=_gen(4))
    query_names = ["wood", "nut", "wood"]
    got = bank.distances(query_names, {"layer": queries})["layer"]
    memories = {"nut": torch.cat([a[0], a[2]]), "wood": torch.cat([a[1], extra[0]])}
    for i, name in enumerate(query_names):
        expected = _brute_force_min_distance(queries[i], memories[name])
        torch.testing.assert_close(got[i].double(), expected, atol=1e-6, rtol=0)


def test_memory_rows_are_at_distance_zero_from_themselves():
    bank = MemoryBank()
    feats = torch.randn(2, 9, 8, generator=_gen(5))
    bank.add(["a", "a"], {1: feats, 2: feats * 2 + 1})
    dist = bank.distances(["a", "a"], {1: feats, 2: feats * 2 + 1})
    for value in dist.values():
        assert value.abs().max() < 1e-5


def test_clear_and_unfitted_class_error_names_class_and_fit_few_shot():
    bank = MemoryBank()
    bank.add(["a"], {1: torch.randn(1, 3, 4)})
    with pytest.raises(FewShotError, match=r"'b'.*fit_few_shot"):
        bank.distances(["a", "b"], {1: torch.randn(2, 3, 4)})
    bank.clear(["a"])
    assert "a" not in bank and len(bank) == 0
    with pytest.raises(ValueError, match="fitted classes: none"):
        bank.check_fitted(["a"])


def test_add_validates_shapes_and_keys():
    bank = MemoryBank()
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        bank.add(["a", "b"], {1: torch.randn(1, 3, 4)})
    with pytest.raises(ValueError, match="at least one key"):
        bank.add(["a"], {})
    bank.add(["a"], {1: torch.randn(1, 3, 4)})
    with pytest.raises(ValueError, match="already holds keys"):
        bank.add(["a"], {2: torch.randn(1, 3, 4)})


def test_upsample_sum_of_constants_and_corner_alignment():
    grid = (3, 3)
    constant = {1: torch.full((2, 9), 0.25), 2: torch.full((2, 9), 0.5)}
    torch.testing.assert_close(upsample_sum(constant, grid, 12), torch.full((2, 12, 12), 0.75))
    # align_corners=True: the four output corners equal the four grid corners exactly.
    values = torch.arange(9.0).reshape(1, 9)
    up = upsample_sum({"x": values}, grid, 10)
    assert up.shape == (1, 10, 10)
    assert [up[0, 0, 0].item(), up[0, 0, -1].item(), up[0, -1, 0].item(), up[0, -1, -1].item()] == [
        0,
        2,
        6,
        8,
    ]


def _features(tokens: dict[int, torch.Tensor]) -> SimpleNamespace:
    """Stand-in for zsad.backbone.ImageFeatures: only ``tokens`` (CLS at position 0) is read."""
    return SimpleNamespace(tokens=tokens)


def test_patch_memory_is_aprilgan_few_shot_map():
    grid, layers, size = (2, 3), (2, 4), 8
    refs = {layer: torch.randn(2, 7, 5, generator=_gen(10 + layer)) for layer in layers}  # 1 CLS + 6 patches
    test = {layer: torch.randn(1, 7, 5, generator=_gen(20 + layer)) for layer in layers}
    memory = PatchMemory(layers, grid)
    memory.fit(_features(refs), ["pill", "pill"])
    got = memory.anomaly_map(_features(test), ["pill"], size)

    expected = torch.zeros(1, size, size, dtype=torch.float64)
    for layer in layers:
        bank = refs[layer][:, 1:].reshape(-1, 5)  # CLS dropped, both images pooled
        dist = _brute_force_min_distance(test[layer][0, 1:], bank).reshape(1, 1, *grid)
        expected += F.interpolate(dist, size=(size, size), mode="bilinear", align_corners=True)[:, 0]
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)

    # Self-reference gives a zero map; refitting a class replaces its memory.
    memory.fit(_features(test), ["pill"])
    assert memory.anomaly_map(_features(test), ["pill"], size).abs().max() < 1e-5
    assert memory.bank.memory("pill", 2).shape == (6, 5)


def test_patch_memory_errors():
    with pytest.raises(ValueError, match="at least one layer"):
        PatchMemory((), (2, 2))
    memory = PatchMemory((3,), (2, 2))
    with pytest.raises(ValueError, match="not requested"):
        memory.fit(_features({1: torch.randn(1, 5, 4)}), ["a"])
    with pytest.raises(FewShotError, match="fit_few_shot"):
        memory.anomaly_map(_features({3: torch.randn(1, 5, 4)}), ["a"], 4)
