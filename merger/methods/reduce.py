"""Whole-tensor reductions accumulated in float64, a chunk at a time.

Angles between multi-GB tensors decide branches (slerp's linear fallback) and scale every output
entry, so their dot products are summed in float64; chunking keeps the float64 copies small.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 20


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dot product of two same-shape tensors over all their entries, accumulated in float64."""
    a = a.reshape(-1)
    b = b.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, a.numel(), CHUNK_ELEMENTS):
        stop = start + CHUNK_ELEMENTS
        total += torch.dot(a[start:stop].double(), b[start:stop].double())
    return float(total)


def pair64(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(|a|, |b|, a.b) in one float64 pass over both tensors."""
    a = a.reshape(-1)
    b = b.reshape(-1)
    sums = torch.zeros(3, dtype=torch.float64, device=a.device)
    for start in range(0, a.numel(), CHUNK_ELEMENTS):
        x = a[start : start + CHUNK_ELEMENTS].double()
        y = b[start : start + CHUNK_ELEMENTS].double()
        sums += torch.stack([torch.dot(x, x), torch.dot(y, y), torch.dot(x, y)])
    aa, bb, ab = sums.tolist()
    return aa**0.5, bb**0.5, ab


def norm64(a: torch.Tensor) -> float:
    """Euclidean norm over all entries, accumulated in float64."""
    return dot64(a, a) ** 0.5
