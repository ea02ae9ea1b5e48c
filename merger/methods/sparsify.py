"""Sparsification of task vectors (a model minus the base), block by block.

Four ways to choose the entries that survive, as in mergekit: the largest magnitudes (TIES), a
magnitude window without the outliers (Model Breadcrumbs), a uniform random draw (DARE), and a
draw whose keep-probability grows with the entry's magnitude rank in its row (DELLA). Optionally the
survivors are rescaled so the vector keeps its L1 norm (mergekit's `rescale`; for DARE that is
1/density in expectation). The k-th magnitude and the L1 norms are whole-tensor quantities: they come
from exact reductions over sweeps of the blocks (see `blocks`), then every block is cut alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from merger.errors import RecipeError
from merger.methods.blocks import Block, Cutoff, Job, Layout, Sums, slice_span, smallest_cutoffs

Sparsifier = Literal["magnitude", "magnitude_outliers", "random", "della_magprune"]

_NORM_FLOOR = 1e-7  # below this L1 norm a rescale would only amplify noise (mergekit's guard)


def della_problem(density: float, epsilon: float) -> str | None:
    """Why DELLA cannot draw with these values: probabilities must stay inside (0, 1)."""
    if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        return (
            f"della needs density - epsilon > 0 and density + epsilon < 1, "
            f"got density={density:g}, epsilon={epsilon:g}"
        )
    return None


def _magnitude_ranks(n: int, density: float) -> list[int]:
    """TIES trim: drop the n - k smallest |delta|, k = max(1, int(density * n))."""
    return [n - max(1, int(density * n))]


def _outlier_ranks(n: int, density: float, gamma: float) -> list[int]:
    """Breadcrumbs: keep the window between the `dropped_low` smallest and the top `gamma` fraction;
    when density + gamma > 1 fewer outliers are dropped so that `density` is still kept."""
    kept = int(density * n)
    dropped_low = max(0, n - kept - int(gamma * n))
    return [dropped_low + kept, dropped_low]


def _della_keep(block: Block, delta: torch.Tensor, density: float, epsilon: float, stream: int) -> torch.Tensor:
    """DELLA MagPrune: keep-probability density - epsilon + 2 * epsilon * (rank / (columns - 1)).

    Ranks are by |delta| along dim 1 (a 1-D tensor is one row), ascending, ties by position; blocks
    hold whole rows for this method, so a block's ranks are the tensor's.
    """
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
    return (block.uniform(stream).reshape(rows.shape) < probs).reshape(delta.shape)


class TaskVectors:
    """sparsify(model_i - base) for chosen inputs of a job, written block by block into a caller's buffer.

    `prepare()` makes the sweeps the sparsifier needs (two for a magnitude selection, one for the L1
    norms of a rescale); `write(block, j, out)` then gives the j-th task vector's block.
    """

    def __init__(self, job: Job, indices: Sequence[int], sparsifier: Sparsifier | None, *, rescale: bool,
                 base_index: int | None = None) -> None:
        self.job = job
        self.indices = list(indices)
        self.sparsifier = sparsifier
        self.rescale = rescale
        self.base_index = job.base_index if base_index is None else base_index
        values = [job.model_params[i] for i in self.indices]
        self.densities = [v.get("density", 1.0) for v in values]
        self.gammas = [v.get("gamma", 0.0) for v in values]
        self.epsilons = [v.get("epsilon", 0.0) for v in values]
        self.active = [j for j, d in enumerate(self.densities)
                       if sparsifier is not None and 0 < d < 1 and job.numel > 0]
        self.stream = {j: s for s, j in enumerate(self.active)}  # random draws: one stream per active vector
        self.cutoffs: dict[int, list[Cutoff]] = {}
        self.factors = [1.0] * len(self.indices)
        if sparsifier == "della_magprune":
            for j in self.active:
                problem = della_problem(self.densities[j], self.epsilons[j])
                if problem:
                    raise RecipeError(f"{problem}; lower epsilon")

    def _raw(self, block: Block, j: int, out: torch.Tensor) -> torch.Tensor:
        return torch.sub(block.tensors[self.indices[j]], block.tensors[self.base_index], out=out)

    def prepare(self) -> "TaskVectors":
        n = self.job.numel
        if self.sparsifier in ("magnitude", "magnitude_outliers") and self.active:
            ks = [_magnitude_ranks(n, self.densities[j]) if self.sparsifier == "magnitude"
                  else _outlier_ranks(n, self.densities[j], self.gammas[j]) for j in self.active]

            def scores(block: Block, s: int) -> torch.Tensor:
                return self._raw(block, self.active[s], block.buffer("delta")).abs_()

            found = smallest_cutoffs(self.job, len(self.active), ks, scores)
            self.cutoffs = dict(zip(self.active, found))
        if self.rescale and self.active:
            norms = Sums(self.job, 2 * len(self.active))

            def visit(block: Block) -> None:
                for s, j in enumerate(self.active):
                    delta = self._raw(block, j, block.buffer("delta"))
                    keep = self._keep(block, j, delta)
                    norms.add(block, 2 * s, delta.abs_())
                    norms.add(block, 2 * s + 1, delta.mul_(keep))
                    # |delta| * keep = |delta * keep|: the second sum is the sparsified L1 norm

            self.job.sweep(visit)
            for s, j in enumerate(self.active):
                before, after = norms.total(2 * s), norms.total(2 * s + 1)
                if before >= _NORM_FLOOR and after >= _NORM_FLOOR:
                    self.factors[j] = before / after
        return self

    def _keep(self, block: Block, j: int, delta: torch.Tensor) -> torch.Tensor:
        density = self.densities[j]
        if self.sparsifier == "magnitude":
            return self.cutoffs[j][0].keep(block, delta.abs())
        if self.sparsifier == "magnitude_outliers":
            magnitudes = delta.abs()
            window, low = self.cutoffs[j]
            return window.mask(block, magnitudes) & ~low.mask(block, magnitudes)
        if self.sparsifier == "random":
            return block.uniform(self.stream[j]) < density
        if self.sparsifier == "della_magprune":
            return _della_keep(block, delta, density, self.epsilons[j], self.stream[j])
        raise ValueError(f"unknown sparsification {self.sparsifier!r}")

    def write(self, block: Block, j: int, out: torch.Tensor) -> torch.Tensor:
        """The j-th sparsified task vector's values in `block`, written into `out`."""
        delta = self._raw(block, j, out)
        if self.sparsifier is not None and self.densities[j] <= 0:
            return delta.zero_()
        if j in self.stream:
            delta.mul_(self._keep(block, j, delta))
            if self.factors[j] != 1.0:
                delta.mul_(self.factors[j])
        return delta


def _job_over(tensors: list[torch.Tensor], max_elements: int | None, whole_rows: bool = False,
              generator: torch.Generator | None = None, model_params: Sequence[dict] = ()) -> tuple[Job, list]:
    """A job over tensors in memory whose emitted blocks are collected into one result tensor."""
    layout = Layout(tensors[0].shape)
    spans = layout.spans(max_elements, whole_rows)
    result = torch.empty(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)

    def emit(span, values: torch.Tensor) -> None:
        slice_span(result, layout, span).copy_(values)

    job = Job(tensors[0].shape, len(tensors), spans, lambda i, final: [slice_span(t, layout, spans[i]) for t in tensors],
              emit, model_params=model_params, generator=generator, device=tensors[0].device)
    return job, [result]


def sparsify_(delta: torch.Tensor, method: Sparsifier, density: float, *, gamma: float = 0.0,
              epsilon: float = 0.0, rescale: bool = False, generator: torch.Generator | None = None,
              max_elements: int | None = None) -> torch.Tensor:
    """Zero the dropped entries of the task vector `delta` in place (and rescale the survivors to its
    L1 norm); return it. The whole-tensor form of `TaskVectors`, cut into blocks of `max_elements`."""
    if density >= 1 or delta.numel() == 0:
        return delta
    if density <= 0:
        return delta.zero_()
    zero = torch.zeros_like(delta)
    job, (result,) = _job_over([delta, zero], max_elements, method == "della_magprune", generator,
                               [{"density": density, "gamma": gamma, "epsilon": epsilon}, {}])
    vectors = TaskVectors(job, [0], method, rescale=rescale, base_index=1).prepare()
    job.emit(lambda block: vectors.write(block, 0, torch.empty(block.shape, device=delta.device)))
    return delta.copy_(result)


def smallest_mask(scores: torch.Tensor, k: int, max_elements: int | None = None) -> torch.Tensor:
    """Mask of the `k` smallest entries of the non-negative `scores`, ties at the threshold going to
    the lower flat index: an exact selection over blocks of `max_elements` entries."""
    job, (result,) = _job_over([scores], max_elements)
    cutoff = smallest_cutoffs(job, 1, [[k]], lambda block, s: block.tensors[0])[0][0]
    job.emit(lambda block: cutoff.mask(block, block.tensors[0]).float())
    return result.bool()


def kth_smallest(scores: torch.Tensor, k: int, max_elements: int | None = None) -> float:
    """The k-th smallest (1-based) of the non-negative `scores`, exactly, seen in blocks of `max_elements`."""
    job, _ = _job_over([scores], max_elements)
    cutoff = smallest_cutoffs(job, 1, [[k]], lambda block, s: block.tensors[0])[0][0]
    if cutoff.threshold is None:
        raise ValueError(f"k={k} is outside 1..{scores.numel()}")
    return cutoff.threshold
