"""The losses of every trained method, once (docs/methods.md §1.4).

APRIL-GAN, CLIP-AD SDP+, AnomalyCLIP and AdaCLIP carry identical copies of two losses from the Hsuxu
segmentation toolbox; MFP-CLIP's paper names the same pair plus BCE on the image score. They are written here
from their definitions:

- :func:`focal_loss` takes *probabilities* (already soft-maxed), not logits: pt = sum_c onehot_c p_c + smooth
  with the one-hot target clamped to [smooth / (C - 1), 1 - smooth], loss = -(1 - pt)^gamma log pt, averaged
  over every pixel (Lin et al. 2017, with the toolbox's label smoothing of 1e-5 and unit alpha).
- :func:`binary_dice_loss` is 1 - (2 sum p g + 1) / (sum p + sum g + 1) per image, averaged over the batch
  (Milletari et al. 2016, smoothing 1).
- :func:`cross_entropy` / :func:`binary_cross_entropy`: the image-level terms (AnomalyCLIP's CE on the global
  logits, MFP-CLIP's BCE on the image score).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

FOCAL_GAMMA = 2.0
FOCAL_SMOOTH = 1e-5
DICE_MODES = ("per-image", "per-row")


def focal_loss(
    probs: torch.Tensor, target: torch.Tensor, gamma: float = FOCAL_GAMMA, smooth: float = FOCAL_SMOOTH
) -> torch.Tensor:
    """Focal loss on probabilities ``probs`` (N, C, ...) against integer classes ``target`` (N, ...).

    ``target`` may be a float mask; it is rounded to the nearest class index (a {0, 1} mask for the anomaly
    maps). Returns the mean over all N x ... positions.
    """
    if probs.dim() < 2:
        raise ValueError(f"focal_loss: probs must be (N, C, ...), got {tuple(probs.shape)}")
    num_classes = probs.shape[1]
    flat = probs.movedim(1, -1).reshape(-1, num_classes)
    index = target.reshape(-1).round().long()
    if index.numel() != flat.shape[0]:
        raise ValueError(
            f"focal_loss: target {tuple(target.shape)} does not match probs {tuple(probs.shape)} without C"
        )
    one_hot = F.one_hot(index, num_classes).to(flat.dtype)
    if smooth:
        one_hot = one_hot.clamp(smooth / (num_classes - 1), 1.0 - smooth)
    pt = (one_hot * flat).sum(dim=1) + smooth
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()


def binary_dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - (2 sum(p g) + smooth) / (sum p + sum g + smooth), per image, averaged over the batch."""
    if pred.shape != target.shape:
        raise ValueError(f"binary_dice_loss: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    p = pred.reshape(pred.shape[0], -1)
    g = target.reshape(target.shape[0], -1).to(p.dtype)
    dice = (2.0 * (p * g).sum(dim=1) + smooth) / (p.sum(dim=1) + g.sum(dim=1) + smooth)
    return 1.0 - dice.mean()


def row_dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """:func:`binary_dice_loss` with every image row a sample of its own: the mean over images and rows of a
    per-row dice. This is what AdaCLIP's official ``train_one_batch`` computes at its batch size 1, where
    ``img_mask.squeeze()`` leaves an (H, W) mask whose first axis ``BinaryDiceLoss`` takes as the batch
    (docs/methods.md §13.10)."""
    if pred.shape != target.shape or pred.dim() < 2:
        raise ValueError(
            f"row_dice_loss: need equal shapes (..., H, W); got {tuple(pred.shape)}, {tuple(target.shape)}"
        )
    return binary_dice_loss(pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1]), smooth)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (N, C) against integer labels (N,)."""
    return F.cross_entropy(logits, labels.long())


def binary_cross_entropy(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of probabilities (N,) against {0, 1} labels (N,)."""
    return F.binary_cross_entropy(probs, labels.to(probs.dtype))


def layer_losses(
    layers: Sequence[int],
    probs: Sequence[torch.Tensor],
    mask: torch.Tensor,
    normal_dice: bool = False,
    dice: str = "per-image",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over tapped layers of :func:`segmentation_loss`, and each layer's value as ``loss_layer<l>``
    (what the trainer logs)."""
    losses = [segmentation_loss(p, mask, normal_dice, dice) for p in probs]
    parts = {f"loss_layer{layer}": loss.item() for layer, loss in zip(layers, losses, strict=True)}
    return sum(losses), parts


def segmentation_loss(
    probs: torch.Tensor, mask: torch.Tensor, normal_dice: bool = False, dice: str = "per-image"
) -> torch.Tensor:
    """The per-layer map loss of the trained methods: focal(P, gt) + dice(P_abnormal, gt), plus
    dice(P_normal, 1 - gt) with ``normal_dice`` (AnomalyCLIP, AdaCLIP; APRIL-GAN and SDP+ have none).

    ``probs`` is (N, 2, H, W) with channel 0 normal and 1 abnormal; ``mask`` (N, H, W) in {0, 1}.
    ``dice``: "per-image" (:func:`binary_dice_loss`) or "per-row" (:func:`row_dice_loss`).
    """
    if dice not in DICE_MODES:
        raise ValueError(f"dice must be one of {', '.join(DICE_MODES)}; got {dice!r}")
    dice_loss = binary_dice_loss if dice == "per-image" else row_dice_loss
    loss = focal_loss(probs, mask) + dice_loss(probs[:, 1], mask)
    if normal_dice:
        loss = loss + dice_loss(probs[:, 0], 1.0 - mask)
    return loss
