"""Sparsification of one task vector (a model minus the base), in place on a buffer the caller owns.

Four ways to choose the entries that survive, as in mergekit: the largest magnitudes (TIES), a
magnitude window without the outliers (Model Breadcrumbs), a uniform random draw (DARE), and a
draw whose keep-probability grows with the entry's magnitude rank in its row (DELLA). Optionally the
survivors are rescaled so the vector keeps its L1 norm (mergekit's `rescale`; for DARE that is
1/density in expectation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from merger.errors import RecipeError

Sparsifier = Literal["magnitude", "magnitude_outliers", "random", "della_magprune"]
Uniform = Callable[[torch.Size, torch.device], torch.Tensor]

_NORM_FLOOR = 1e-7  # below this L1 norm a rescale would only amplify noise (mergekit's guard)


_SAMPLE = 65_536  # entries sampled to bracket the k-th value before the exact selection


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of a 1-D tensor, exactly.

    A full selection is single-threaded and dominates TIES on large tensors, so a fixed pseudo-random
    sample first brackets the answer; the exact selection then runs only on the entries inside the
    bracket. When the bracket misses (it cannot be wrong, only unlucky) the full selection runs.
    """
    n = flat.numel()
    if n > 16 * _SAMPLE:
        picks = torch.randint(n, (_SAMPLE,), generator=torch.Generator().manual_seed(n + k)).to(flat.device)
        sample = flat[picks]
        q = k / n
        margin = int(6 * (_SAMPLE * q * (1 - q)) ** 0.5) + 16
        centre = int(q * _SAMPLE)
        lo = torch.kthvalue(sample, max(1, centre - margin)).values
        hi = torch.kthvalue(sample, min(_SAMPLE, centre + margin)).values
        below = int(torch.count_nonzero(flat < lo))
        if below < k:
            band = flat[(flat >= lo) & (flat <= hi)]
            if below + band.numel() >= k:
                return torch.kthvalue(band, k - below).values
    return torch.kthvalue(flat, k).values


def smallest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the `k` smallest entries of `scores`.

    Ties at the threshold go to the lower flat index, so the selection is one total order on every
    device. Uses a selection (bracketed kthvalue), not a sort: linear time, no int64 index per element.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = kth_smallest(flat, k)
    mask = flat <= threshold
    extra = int(torch.count_nonzero(mask)) - k
    if extra > 0:  # more entries equal the threshold than fit: drop the ties with the highest indices
        ties = torch.nonzero(flat == threshold).squeeze(1)
        mask[ties[ties.numel() - extra:]] = False
    return mask.reshape(scores.shape)


def _magnitude_keep(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the `density` fraction with the largest |delta| (at least one entry)."""
    n = delta.numel()
    k = max(1, int(density * n))
    return ~smallest_mask(delta.abs(), n - k)


def _outlier_keep(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the top `gamma` fraction by |delta|, then the smallest, keeping `density`.

    When density + gamma > 1 fewer outliers are dropped so that `density` is still kept.
    """
    n = delta.numel()
    kept = int(density * n)
    dropped_low = max(0, n - kept - int(gamma * n))
    magnitudes = delta.abs()
    return smallest_mask(magnitudes, dropped_low + kept) & ~smallest_mask(magnitudes, dropped_low)


def della_problem(density: float, epsilon: float) -> str | None:
    """Why DELLA cannot draw with these values: probabilities must stay inside (0, 1)."""
    if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        return (
            f"della needs density - epsilon > 0 and density + epsilon < 1, "
            f"got density={density:g}, epsilon={epsilon:g}"
        )
    return None


def _della_keep(delta: torch.Tensor, density: float, epsilon: float, uniform: Uniform) -> torch.Tensor:
    """DELLA MagPrune: keep-probability density - epsilon + 2 * epsilon * (rank / (columns - 1)).

    Ranks are by |delta| along dim 1 (a 1-D tensor is one row), ascending, ties by position.
    """
    problem = della_problem(density, epsilon)
    if problem:
        raise RecipeError(f"{problem}; lower epsilon")
    rows = delta if delta.dim() >= 2 else delta.reshape(1, -1)
    columns = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    steps = torch.arange(columns, dtype=torch.float32, device=delta.device)
    steps = steps.view([1, columns] + [1] * (rows.dim() - 2)).expand_as(rows)
    probs = torch.empty_like(rows).scatter_(1, order, steps)
    del order
    if columns > 1:
        probs.div_(columns - 1).mul_(2).mul_(epsilon).add_(density - epsilon)
    else:
        probs.fill_(density)  # a single column has no rank spread (mergekit divides 0 by 0 here)
    keep = uniform(rows.shape, delta.device) < probs
    return keep.reshape(delta.shape)


def sparsify_(
    delta: torch.Tensor,
    method: Sparsifier,
    density: float,
    *,
    gamma: float = 0.0,
    epsilon: float = 0.0,
    rescale: bool = False,
    uniform: Uniform | None = None,
) -> torch.Tensor:
    """Zero the dropped entries of `delta` in place (and rescale survivors to its L1 norm); return it.

    `uniform(shape, device)` supplies the random draws of "random" and "della_magprune".
    """
    if density >= 1 or delta.numel() == 0:
        return delta
    if density <= 0:
        return delta.zero_()
    l1_before = torch.linalg.vector_norm(delta, ord=1) if rescale else None
    if method == "magnitude":
        keep = _magnitude_keep(delta, density)
    elif method == "magnitude_outliers":
        keep = _outlier_keep(delta, density, gamma)
    elif method == "random":
        assert uniform is not None
        keep = uniform(delta.shape, delta.device) < density
    elif method == "della_magprune":
        assert uniform is not None
        keep = _della_keep(delta, density, epsilon, uniform)
    else:
        raise ValueError(f"unknown sparsification {method!r}")
    delta.mul_(keep)
    del keep
    if l1_before is not None:
        l1_after = torch.linalg.vector_norm(delta, ord=1)
        if l1_before >= _NORM_FLOOR and l1_after >= _NORM_FLOOR:
            delta.mul_(l1_before / l1_after)
    return delta
