"""Task arithmetic and its descendants: one algorithm with three knobs, plus SCE.

    delta_i  = sparsify(model_i - base)                     (none | TIES trim | DARE | breadcrumbs | DELLA)
    mixed    = sum_i weight_i * delta_i * agree_i            (agree_i = 1 without sign consensus)
    mixed   /= sum_i weight_i * agree_i                      (only with normalize)
    merged   = base + lambda * mixed

Sign consensus (TIES) elects, per entry, the sign of sum_i weight_i * delta_i (zero counts as +)
and keeps only the deltas of that sign. Papers: task arithmetic https://arxiv.org/abs/2212.04089,
TIES https://arxiv.org/abs/2306.01708, DARE https://arxiv.org/abs/2311.03099, Model Breadcrumbs
https://arxiv.org/abs/2312.06795, DELLA https://arxiv.org/abs/2406.11617.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from merger.errors import RecipeError
from merger.methods.base import REQUIRED, Interval, Method, Param
from merger.methods.blocks import Block, Job, Sums, smallest_cutoffs
from merger.methods.sparsify import Sparsifier, TaskVectors, della_problem

_UNIT = Interval(0.0, 1.0)
_INT8_MASK = Param(
    "int8_mask", bool, "shared", False, doc="accepted for compatibility; masks here are always 1-byte bools"
)
_WEIGHT = Param("weight", float, "non_base", REQUIRED, doc="scale of this model's task vector")
_DENSITY = Param("density", float, "non_base", 1.0, Interval(0, 1, low_open=True),
                 doc="fraction of the task vector kept (0 would drop the model: remove it instead)")
_GAMMA = Param("gamma", float, "non_base", 0.01, _UNIT, doc="fraction of largest-magnitude outliers dropped")
_EPSILON = Param(
    "epsilon", float, "non_base", 0.15, Interval(0.0, 0.5, high_open=True),
    doc="keep-probabilities span density +/- epsilon by magnitude rank",
)
_ZERO_WEIGHT_SUM = 1e-8  # mergekit's guard on the divisor of the non-consensus mean


def _finish(job: Job, block: Block, mixed: torch.Tensor) -> torch.Tensor:
    """base + lambda * mixed, reusing `mixed`'s storage."""
    if job.params["lambda"] != 1:
        mixed.mul_(job.params["lambda"])
    return mixed.add_(block.tensors[job.base_index])


def _merge_independent(job: Job, sparsifier: Sparsifier | None) -> None:
    """No sign consensus: accumulate weight_i * delta_i one model at a time (one scratch tensor)."""
    others = job.other_indices
    weights = job.values("weight", others)
    divisor = None
    if job.params["normalize"]:
        divisor = float(torch.tensor(weights, dtype=torch.float32).sum())
        if abs(divisor) < _ZERO_WEIGHT_SUM:
            if any(weights):
                raise RecipeError(
                    f"the weights of {job.name or 'a tensor'} sum to zero and normalize is true; "
                    "change the weights or set normalize: false"
                )
            divisor = 1.0
    vectors = TaskVectors(job, others, sparsifier, rescale=job.params["rescale"]).prepare()

    def produce(block: Block) -> torch.Tensor:
        mixed = block.buffer("result").zero_()
        scratch = block.buffer("scratch")
        for j, weight in enumerate(weights):
            mixed.add_(vectors.write(block, j, scratch).mul_(weight))
        if divisor is not None:
            mixed.div_(divisor)
        return _finish(job, block, mixed)

    job.emit(produce)


def erase_disagreeing_(vectors: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the entries of each row whose sign differs from the sign of the rows' sum.

    The elected sign is + where the sum is >= 0. Afterwards an entry is non-zero exactly where
    it agrees (a zero entry never agrees), which is how the divisors below count agreement.
    """
    positive = vectors.sum(dim=0) >= 0
    for row in vectors:
        # a multiply by the agreement mask is three times faster than masked_fill_; it leaves -0.0
        # where a negative entry is dropped, and adding +0.0 turns every zero into +0.0 (x + 0.0 == x
        # for any other x), so the result is the fill's bit for bit except kept zeros lose their sign
        row.mul_(torch.gt(row, 0).eq_(positive)).add_(0.0)
    return vectors


def _agreeing_weight_(vectors: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """sum_i weight_i over the rows whose entry survived `erase_disagreeing_`, computed in the storage
    of `vectors` (overwriting it: call it last) so it needs no tensor of its own; a view of it."""
    for row, weight in zip(vectors, weights):
        torch.ne(row, 0, out=row).mul_(weight)  # 1.0 where the entry survived, times the weight
    total = vectors[0]
    for row in vectors[1:]:
        total.add_(row)
    return total


def _merge_with_consensus(job: Job, sparsifier: Sparsifier | None) -> None:
    """TIES: weighted deltas of the elected sign, averaged over the weights that agree."""
    others = job.other_indices
    weights = job.values("weight", others)
    vectors = TaskVectors(job, others, sparsifier, rescale=job.params["rescale"]).prepare()
    normalize = job.params["normalize"]

    def produce(block: Block) -> torch.Tensor:
        deltas = block.buffer("deltas", (len(others), *block.shape))
        for j, weight in enumerate(weights):
            vectors.write(block, j, deltas[j]).mul_(weight)
        erase_disagreeing_(deltas)
        mixed = torch.sum(deltas, dim=0, out=block.buffer("result"))
        if normalize:
            divisor = _agreeing_weight_(deltas, weights)
            mixed.div_(divisor.add_(divisor == 0))  # 0 -> 1, exact
        return _finish(job, block, mixed)

    job.emit(produce)


def _task_arithmetic_method(
    name: str, pretty_name: str, paper: str, sparsifier: Sparsifier | None, consensus: bool,
    normalize: bool, rescale: bool,
) -> Method:
    """One member of the family: which sparsifier, whether TIES sign consensus, which defaults."""
    params = [
        _INT8_MASK,
        Param("normalize", bool, "shared", normalize, doc="divide by the sum of (agreeing) weights"),
        Param("rescale", bool, "shared", rescale, doc="rescale sparsified task vectors to their L1 norm"),
        Param("lambda", float, "shared", 1.0, doc="scale of the merged task vector"),
        _WEIGHT,
        _DENSITY,
    ]
    if sparsifier == "magnitude_outliers":
        params.append(_GAMMA)
    if sparsifier == "della_magprune":
        params.append(_EPSILON)
    merge = _merge_with_consensus if consensus else _merge_independent

    def kernel(job: Job) -> None:
        if not job.other_indices:
            job.emit(lambda block: block.tensors[job.base_index].clone())
            return
        merge(job, sparsifier)

    return Method(
        name=name,
        pretty_name=pretty_name,
        paper=paper,
        inputs="a base_model plus any number of models; each non-base model takes weight (and density, "
        "gamma, epsilon where the method has them); the base takes none",
        params=tuple(params),
        base="required",
        kernel=kernel,
        randomized=sparsifier in ("random", "della_magprune"),
        constraint=_della_constraint if sparsifier == "della_magprune" else None,
        whole_rows=sparsifier == "della_magprune",
        scratch=(lambda n: n + 4.0) if consensus else (lambda n: 6.0),
    )


def _della_constraint(values: Mapping[str, Any]) -> str | None:
    return della_problem(values["density"], values["epsilon"])


TASK_ARITHMETIC_METHODS = (
    _task_arithmetic_method("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089",
                            None, consensus=False, normalize=False, rescale=False),
    _task_arithmetic_method("ties", "TIES", "https://arxiv.org/abs/2306.01708",
                            "magnitude", consensus=True, normalize=True, rescale=False),
    _task_arithmetic_method("dare_ties", "DARE TIES", "https://arxiv.org/abs/2311.03099",
                            "random", consensus=True, normalize=False, rescale=True),
    _task_arithmetic_method("dare_linear", "Linear DARE", "https://arxiv.org/abs/2311.03099",
                            "random", consensus=False, normalize=False, rescale=True),
    _task_arithmetic_method("breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795",
                            "magnitude_outliers", consensus=False, normalize=False, rescale=False),
    _task_arithmetic_method("breadcrumbs_ties", "Model Breadcrumbs with TIES",
                            "https://arxiv.org/abs/2312.06795",
                            "magnitude_outliers", consensus=True, normalize=False, rescale=False),
    _task_arithmetic_method("della", "DELLA", "https://arxiv.org/abs/2406.11617",
                            "della_magprune", consensus=True, normalize=True, rescale=True),
    _task_arithmetic_method("della_linear", "Linear DELLA", "https://arxiv.org/abs/2406.11617",
                            "della_magprune", consensus=False, normalize=False, rescale=True),
)


def _sce_kernel(job: Job) -> None:
    """SCE (https://arxiv.org/abs/2408.07990): Select, Calculate, Erase.

    Select the `select_topk` fraction of entries with the largest variance across task vectors,
    weight each task vector by its mean square (normalised to sum 1), erase the entries that
    disagree with the elected sign, and average over the weights that remain.
    """
    others = job.other_indices
    base = job.base_index
    if not others:
        job.emit(lambda block: block.tensors[base].clone())
        return

    def task_vectors(block: Block) -> torch.Tensor:
        vectors = block.buffer("vectors", (len(others), *block.shape))
        for row, index in enumerate(others):
            torch.sub(block.tensors[index], block.tensors[base], out=vectors[row])
        return vectors

    def variance(block: Block, stream: int = 0) -> torch.Tensor:
        return torch.var(task_vectors(block), dim=0, unbiased=False)

    select = job.params["select_topk"]
    cutoff = None
    if select < 1:
        nonzero = [0]

        def count_nonzero(block: Block) -> None:
            nonzero[0] += int(torch.count_nonzero(variance(block)))

        def drop() -> list[list[int]]:
            return [[job.numel - int(nonzero[0] * select)]]

        cutoff = smallest_cutoffs(job, 1, drop, variance, also=count_nonzero)[0][0]

    def selected(block: Block) -> torch.Tensor:
        vectors = task_vectors(block)
        if cutoff is not None:
            vectors.mul_(~cutoff.mask(block, torch.var(vectors, dim=0, unbiased=False)))
        return vectors

    squares = Sums(job, len(others))

    def visit(block: Block) -> None:
        for row, vector in enumerate(selected(block)):
            squares.add(block, row, vector, vector)

    job.sweep(visit)
    mean_squares = [v / job.numel for v in squares.totals()]
    total = sum(mean_squares)
    weights = [1 / len(others)] * len(others) if abs(total) < 1e-6 else [m / total for m in mean_squares]

    def produce(block: Block) -> torch.Tensor:
        vectors = erase_disagreeing_(selected(block))
        merged = block.buffer("result").zero_()
        for row, weight in zip(vectors, weights):
            merged.add_(row, alpha=weight)
        divisor = _agreeing_weight_(vectors, weights)
        return merged.div_(divisor.clamp_(min=1e-6)).add_(block.tensors[base])

    job.emit(produce)


SCE = Method(
    name="sce",
    pretty_name="SCE",
    paper="https://arxiv.org/abs/2408.07990",
    inputs="a base_model plus any number of models; no per-model parameters (weights come from the "
    "task vectors' mean squares)",
    params=(
        _INT8_MASK,
        Param("select_topk", float, "shared", 1.0, _UNIT, doc="fraction of highest-variance entries kept"),
    ),
    base="required",
    kernel=_sce_kernel,
    scratch=lambda n: n + 4.0,
)
