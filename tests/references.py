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
