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
from merger.methods.base import REQUIRED, Interval, MergeInputs, Method, Param
from merger.methods.reduce import dot64
from merger.methods.sparsify import Sparsifier, della_problem, smallest_mask, sparsify_

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


def _task_vector(inputs: MergeInputs, index: int, out: torch.Tensor, sparsifier: Sparsifier | None) -> None:
    """Write sparsify(model - base) for input `index` into `out`."""
    torch.sub(inputs.tensors[index], inputs.base, out=out)
    if sparsifier is None:
        return
    values = inputs.model_params[index]
    sparsify_(
        out,
        sparsifier,
        values["density"],
        gamma=values.get("gamma", 0.0),
        epsilon=values.get("epsilon", 0.0),
        rescale=inputs.params["rescale"],
        uniform=inputs.draw_uniform,
    )


def _finish(inputs: MergeInputs, mixed: torch.Tensor) -> torch.Tensor:
    """base + lambda * mixed, reusing `mixed`'s storage."""
    if inputs.params["lambda"] != 1:
        mixed.mul_(inputs.params["lambda"])
    return mixed.add_(inputs.base)


def _merge_independent(inputs: MergeInputs, sparsifier: Sparsifier | None) -> torch.Tensor:
    """No sign consensus: accumulate weight_i * delta_i one model at a time (one scratch tensor)."""
    others = inputs.other_indices
    weights = inputs.values("weight", others)
    mixed = inputs.buffer("result", inputs.base.shape).zero_()
    scratch = inputs.buffer("scratch", inputs.base.shape)
    for index, weight in zip(others, weights):
        _task_vector(inputs, index, scratch, sparsifier)
        mixed.add_(scratch.mul_(weight))
    del scratch
    if inputs.params["normalize"]:
        divisor = float(torch.tensor(weights, dtype=torch.float32).sum())
        if abs(divisor) < _ZERO_WEIGHT_SUM:
            if any(weights):
                raise RecipeError(
                    f"the weights of {inputs.name or 'a tensor'} sum to zero and normalize is true; "
                    "change the weights or set normalize: false"
                )
            divisor = 1.0
        mixed.div_(divisor)
    return _finish(inputs, mixed)


def erase_disagreeing_(vectors: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the entries of each row whose sign differs from the sign of the rows' sum.

    The elected sign is + where the sum is >= 0. Afterwards an entry is non-zero exactly where
    it agrees (a zero entry never agrees), which is how the divisors below count agreement.
    """
    positive = vectors.sum(dim=0) >= 0
    for row in vectors:
        row.masked_fill_((row > 0) != positive, 0)  # zero entries are unchanged by the fill
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


def _merge_with_consensus(inputs: MergeInputs, sparsifier: Sparsifier | None) -> torch.Tensor:
    """TIES: weighted deltas of the elected sign, averaged over the weights that agree."""
    others = inputs.other_indices
    weights = inputs.values("weight", others)
    base = inputs.base
    deltas = inputs.buffer("deltas", (len(others), *base.shape))
    for row, index in enumerate(others):
        _task_vector(inputs, index, deltas[row], sparsifier)
        deltas[row].mul_(weights[row])
    erase_disagreeing_(deltas)
    mixed = torch.sum(deltas, dim=0, out=inputs.buffer("result", base.shape))
    divisor = _agreeing_weight_(deltas, weights) if inputs.params["normalize"] else None
    del deltas
    if divisor is not None:
        mixed.div_(divisor.masked_fill_(divisor == 0, 1))
    return _finish(inputs, mixed)


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

    def kernel(inputs: MergeInputs) -> torch.Tensor:
        if not inputs.other_indices:
            return inputs.base.clone()
        return merge(inputs, sparsifier)

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


def _sce_kernel(inputs: MergeInputs) -> torch.Tensor:
    """SCE (https://arxiv.org/abs/2408.07990): Select, Calculate, Erase.

    Select the `select_topk` fraction of entries with the largest variance across task vectors,
    weight each task vector by its mean square (normalised to sum 1), erase the entries that
    disagree with the elected sign, and average over the weights that remain.
    """
    others = inputs.other_indices
    base = inputs.base
    if not others:
        return base.clone()
    vectors = base.new_empty((len(others), *base.shape))
    for row, index in enumerate(others):
        torch.sub(inputs.tensors[index], base, out=vectors[row])
    select = inputs.params["select_topk"]
    if select < 1:
        variance = torch.var(vectors, dim=0, unbiased=False)
        kept = int(int(torch.count_nonzero(variance)) * select)
        vectors.mul_(~smallest_mask(variance, variance.numel() - kept))
        del variance
    mean_squares = [dot64(v, v) / v.numel() for v in vectors]
    total = sum(mean_squares)
    weights = [1 / len(others)] * len(others) if abs(total) < 1e-6 else [m / total for m in mean_squares]
    erase_disagreeing_(vectors)
    merged = torch.zeros_like(base)
    for row, weight in zip(vectors, weights):
        merged.add_(row, alpha=weight)
    divisor = _agreeing_weight_(vectors, weights)
    del vectors
    return merged.div_(divisor.clamp_(min=1e-6)).add_(base)


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
)
