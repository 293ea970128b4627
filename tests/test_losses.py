"""Losses against references written pixel by pixel from their definitions (docs/methods.md §1.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zsad import losses


def focal_reference(probs: np.ndarray, target: np.ndarray, gamma=2.0, smooth=1e-5) -> float:
    """Loop over pixels: clamped one-hot, pt = <onehot, p> + smooth, -(1 - pt)^gamma log pt, mean."""
    n, c = probs.shape[:2]
    total, count = 0.0, 0
    for i in range(n):
        for pos in np.ndindex(*probs.shape[2:]):
            onehot = np.full(c, smooth / (c - 1))
            onehot[int(target[(i, *pos)])] = 1.0 - smooth
            pt = sum(onehot[k] * probs[(i, k, *pos)] for k in range(c)) + smooth
            total += -((1.0 - pt) ** gamma) * math.log(pt)
            count += 1
    return total / count


def dice_reference(pred: np.ndarray, target: np.ndarray) -> float:
    values = []
    for p, g in zip(pred, target, strict=True):
        values.append(1.0 - (2.0 * float((p * g).sum()) + 1.0) / (float(p.sum()) + float(g.sum()) + 1.0))
    return float(np.mean(values))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 2, 5, 6, generator=g, dtype=torch.float64).softmax(dim=1)
    mask = (torch.rand(3, 5, 6, generator=g) > 0.7).double()
    return probs, mask


def test_focal_matches_reference(batch):
    probs, mask = batch
    ours = losses.focal_loss(probs, mask).item()
    assert ours == pytest.approx(focal_reference(probs.numpy(), mask.numpy()), abs=1e-12)


def test_focal_three_classes_and_gamma():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64).softmax(dim=1)
    target = torch.randint(0, 3, (2, 4, 4), generator=g)
    ours = losses.focal_loss(probs, target, gamma=1.5).item()
    assert ours == pytest.approx(focal_reference(probs.numpy(), target.numpy(), gamma=1.5), abs=1e-12)


def test_focal_is_small_for_confident_right_answers_and_large_for_wrong_ones(batch):
    _, mask = batch
    right = torch.stack([1.0 - mask, mask], dim=1).clamp(1e-6, 1 - 1e-6)
    wrong = right.flip(1)
    assert losses.focal_loss(right, mask) < 1e-8 < 1.0 < losses.focal_loss(wrong, mask)


def test_dice_matches_reference(batch):
    probs, mask = batch
    ours = losses.binary_dice_loss(probs[:, 1], mask).item()
    assert ours == pytest.approx(dice_reference(probs[:, 1].numpy(), mask.numpy()), abs=1e-12)


def test_dice_shape_mismatch_is_a_clear_error(batch):
    probs, mask = batch
    with pytest.raises(ValueError, match="shapes differ"):
        losses.binary_dice_loss(probs[:, 1], mask[:, :4])


def test_segmentation_loss_parts(batch):
    probs, mask = batch
    p, g = probs.numpy(), mask.numpy()
    expected = focal_reference(p, g) + dice_reference(p[:, 1], g)
    assert losses.segmentation_loss(probs, mask).item() == pytest.approx(expected, abs=1e-12)
    with_normal = expected + dice_reference(p[:, 0], 1.0 - g)
    assert losses.segmentation_loss(probs, mask, normal_dice=True).item() == pytest.approx(
        with_normal, abs=1e-12
    )


def test_cross_entropy_and_bce_match_their_formulas():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.25]], dtype=torch.float64)
    labels = torch.tensor([1, 0])
    expected = -np.mean(
        [
            logits[i, labels[i]].item() - math.log(math.exp(logits[i, 0]) + math.exp(logits[i, 1]))
            for i in range(2)
        ]
    )
    assert losses.cross_entropy(logits, labels).item() == pytest.approx(expected, abs=1e-12)
    probs = torch.tensor([0.9, 0.2], dtype=torch.float64)
    bce = -np.mean([math.log(0.9), math.log(0.8)])
    assert losses.binary_cross_entropy(probs, torch.tensor([1, 0])).item() == pytest.approx(bce, abs=1e-12)
