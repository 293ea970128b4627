"""Independent slow references shared by several test files (written from the definitions, not from zsad)."""

from __future__ import annotations

import numpy as np


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """1-D linear interpolation weights, half-pixel centres (align_corners=False), clamped at the edges."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[i, i0] += 1 - lam
        m[i, i1] += lam
    return m


def bilinear_matrix_aligned(n_in: int, n_out: int) -> np.ndarray:
    """1-D linear interpolation weights, align_corners=True: output i samples input i (n_in-1)/(n_out-1)."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[i, i0] += 1 - lam
        m[i, i1] += lam
    return m


def jitter_layernorms(clip, seed: int = 9, weight_scale: float = 0.3, bias_scale: float = 0.1):
    """Randomise every LayerNorm of a CLIPBackbone in place (weight 1 + N(0, 0.3), bias N(0, 0.1)).

    open_clip initialises LayerNorms to weight 1 / bias 0, under which a re-implementation that swaps
    ln_1/ln_2 or ln_pre/ln_post, or applies an affine twice, gives the same numbers as the right one.
    The weights id is tagged so that a feature cache never mixes these weights with the plain random init.
    """
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in clip.model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(weight_scale * torch.randn(module.weight.shape, generator=gen))
                module.bias.add_(bias_scale * torch.randn(module.bias.shape, generator=gen))
    clip.weights_id = f"{clip.weights_id}+ln-jitter-{seed}"
    return clip


def focal_loss_np(probs: np.ndarray, target: np.ndarray, gamma: float = 2.0, smooth: float = 1e-5) -> float:
    """Focal loss on probabilities (Lin et al. 2017) as the segmentation toolbox the official repositories
    copy defines it: probs (N, C, ...), integer target (N, ...); the one-hot target is clipped to
    [smooth / (C - 1), 1 - smooth], pt = <one-hot, p> + smooth, loss = mean of -(1 - pt)^gamma log pt."""
    num_classes = probs.shape[1]
    flat = np.moveaxis(probs, 1, -1).reshape(-1, num_classes).astype(np.float64)
    one_hot = np.eye(num_classes)[np.rint(target).astype(int).reshape(-1)]
    one_hot = np.clip(one_hot, smooth / (num_classes - 1), 1.0 - smooth)
    pt = (one_hot * flat).sum(axis=1) + smooth
    return float(np.mean(-((1.0 - pt) ** gamma) * np.log(pt)))


def dice_loss_np(pred: np.ndarray, target: np.ndarray, smooth: float = 1.0) -> float:
    """Binary dice loss (Milletari et al. 2016): 1 - mean over the first axis of
    (2 sum p g + smooth) / (sum p + sum g + smooth), the sums over every other axis."""
    p = pred.reshape(pred.shape[0], -1).astype(np.float64)
    g = target.reshape(target.shape[0], -1).astype(np.float64)
    return float(1.0 - np.mean((2.0 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)))
