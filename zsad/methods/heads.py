"""Learned linear heads on frozen CLIP tokens and their map arithmetic (APRIL-GAN and CLIP-AD SDP+).

Both papers project raw residual-stream tokens of a few layers with one ``Linear(width -> embed_dim)`` per
layer into CLIP's joint space, score them against the text with a logit scale of 100, upsample the **logits**
bilinearly with ``align_corners=True`` and only then take the softmax over {normal, abnormal}
(docs/methods.md §3.3, §4.5, pitfall 3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_SCALE = 100.0


def token_logits(tokens: torch.Tensor, text: torch.Tensor, scale: float = LOGIT_SCALE) -> torch.Tensor:
    """scale x <normalise(tokens), T>: tokens (B, N, D), text (B, D, 2) -> (B, N, 2)."""
    return scale * torch.einsum("bnd,bdk->bnk", F.normalize(tokens, dim=-1), text)


def upsampled_probs(logits: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """Token logits (B, N, 2) -> (B, 2, S, S): bilinear upsampling (``align_corners=True``), then softmax."""
    batch, _, states = logits.shape
    grid_logits = logits.transpose(1, 2).reshape(batch, states, *grid)
    up = F.interpolate(grid_logits, size=(size, size), mode="bilinear", align_corners=True)
    return up.softmax(dim=1)


class LinearHeads(nn.Module):
    """One ``Linear(in -> out)`` with bias per tapped layer (APRIL-GAN's and SDP+'s ``LinearLayer``)."""

    def __init__(self, in_features: int, out_features: int, count: int) -> None:
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(in_features, out_features) for _ in range(count))

    def forward(self, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [fc(t) for fc, t in zip(self.fc, tokens, strict=True)]
