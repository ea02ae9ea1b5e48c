"""Methods that keep a fine-tune's change only where a mask says so: Arcee Fusion, RAM and RAM+.

Arcee Fusion (https://arcee.ai) merges a base and one model: an entry takes the model's value where
its importance |model - base| * KL(softmax(model) || softmax(base)) (the KL divergence of each row,
along the last dimension) reaches median + 1.5 * IQR of all importances, and the base's value
elsewhere. The quartiles are order statistics at floor(q * (n - 1)); mergekit 0.1.5 estimates them
from a random sample of 10^6 entries on larger tensors, here they are exact on every tensor (found over
blocks by `blocks.smallest_cutoffs`; the KL divergence needs whole rows, so blocks never cut a row).

RAM, Reinforced Agent Merging (https://arxiv.org/abs/2601.13572): an entry's task vector entries
whose magnitude exceeds epsilon count as contributions; entries one model alone changed keep that
model's change, entries several models changed take the mean of their changes. RAM+ (tensor-local)
scales each model's unique entries by 1 + r * min(alpha, shared / unique), where shared and unique
count that model's contributions in the tensor that other models also changed, or it alone changed.
"""

from __future__ import annotations

import torch

from merger.methods.base import Method, Param
from merger.methods.blocks import Block, Job, smallest_cutoffs

_KL_EPS = 1e-8  # added to both distributions before the log, as mergekit does
_QUARTILES = (0.25, 0.5, 0.75)


def _importance(block: Block, base: int, other: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's delta (model - base) and its importance |delta| * KL(row of model || row of base)."""
    model, origin = block.tensors[other], block.tensors[base]
    delta = torch.sub(model, origin, out=block.buffer("result"))
    p = torch.softmax(model, dim=-1).add_(_KL_EPS)
    q = torch.softmax(origin, dim=-1).add_(_KL_EPS)
    kl = torch.div(p, q).log_().mul_(p).sum(dim=-1, keepdim=True)
    del p, q
    return delta, delta.abs().mul_(kl)


def _signed_quantiles(job: Job, score, ranks: list[int]) -> list[float]:
    """The ranks-th smallest (1-based) of signed float32 scores, exactly. The selection works on
    non-negative values, so negatives (a KL divergence rounds below zero for near-equal rows) are
    ranked by magnitude in a stream of their own; entries outside a stream score +inf there."""
    negatives = [0]
    last: list = [None, None]  # the block last scored and its scores: each stream reads them once a pass

    def scored(block: Block) -> torch.Tensor:
        if last[0] is not block:
            last[:] = [block, score(block)]
        return last[1]

    def streams(block: Block, s: int) -> torch.Tensor:
        x = scored(block)
        return torch.where(x < 0, -x, torch.inf) if s == 0 else torch.where(x >= 0, x, torch.inf)

    def count(block: Block) -> None:
        negatives[0] += int(torch.count_nonzero(scored(block) < 0))

    def wanted() -> list[list[int]]:
        n = negatives[0]
        return [[n - k + 1 for k in ranks if k <= n], [k - n for k in ranks if k > n]]

    cutoffs = smallest_cutoffs(job, 2, wanted, streams, also=count)
    below, above = iter(cutoffs[0]), iter(cutoffs[1])
    return [-next(below).threshold if k <= negatives[0] else next(above).threshold for k in ranks]


def _fusion_kernel(job: Job) -> None:
    base = job.base_index
    (other,) = job.other_indices
    ranks = [int(torch.tensor(q, dtype=torch.float32) * (job.numel - 1)) + 1 for q in _QUARTILES]
    q1, median, q3 = _signed_quantiles(job, lambda block: _importance(block, base, other)[1], ranks)
    threshold = median + 1.5 * (q3 - q1)

    def produce(block: Block) -> torch.Tensor:
        delta, importance = _importance(block, base, other)
        delta.mul_(importance >= threshold)
        return delta.add_(block.tensors[base])

    job.emit(produce)


ARCEE_FUSION = Method(
    name="arcee_fusion",
    pretty_name="Arcee Fusion",
    paper="https://arcee.ai",
    inputs="exactly two models: the base_model and one fine-tune",
    params=(),
    base="required",
    kernel=_fusion_kernel,
    min_models=2,
    max_models=2,
    whole_rows=True,  # the KL divergence is taken along each row
    scratch=lambda n: 5.0,
)


def _contributions(block: Block, base: int, others: list[int], epsilon: float) -> torch.Tensor:
    """Per entry, how many of the non-base inputs changed it by more than epsilon."""
    origin = block.tensors[base]
    counts = torch.zeros(origin.shape, dtype=torch.int32, device=origin.device)
    for i in others:
        counts += torch.sub(block.tensors[i], origin).abs_() > epsilon
    return counts


def _ram(job: Job, plus: bool) -> None:
    base, others = job.base_index, job.other_indices
    epsilon = job.params["epsilon"]
    factors = [1.0] * len(others)
    if plus:  # per model: its contributions other models share, and those it alone makes, over the tensor
        shared = [0] * len(others)
        unique = [0] * len(others)

        def visit(block: Block) -> None:
            counts = _contributions(block, base, others, epsilon)
            for m, i in enumerate(others):
                contributes = torch.sub(block.tensors[i], block.tensors[base]).abs_() > epsilon
                shared[m] += int(torch.count_nonzero(contributes & (counts > 1)))
                unique[m] += int(torch.count_nonzero(contributes & (counts == 1)))

        job.sweep(visit)
        for m in range(len(others)):  # float32 scalars, as mergekit computes them
            rho = torch.tensor(shared[m]) / torch.tensor(unique[m]).clamp(min=epsilon)
            factors[m] = 1 + job.params["r"] * rho.clamp(min=0, max=job.params["alpha"])

    def produce(block: Block) -> torch.Tensor:
        origin = block.tensors[base]
        counts = _contributions(block, base, others, epsilon)
        unique, overlap = counts == 1, counts > 1
        divisor = counts.clamp(min=1).float()
        merged = torch.zeros_like(origin)
        for m, i in enumerate(others):
            delta = torch.sub(block.tensors[i], origin)
            delta.mul_(delta.abs() > epsilon)
            own = delta * unique
            if plus:
                own *= factors[m]
            merged += own + delta * overlap / divisor
        return merged.add_(origin)

    job.emit(produce)


def _ram_kernel(job: Job) -> None:
    _ram(job, plus=False)


def _ramplus_kernel(job: Job) -> None:
    _ram(job, plus=True)


_EPSILON = Param("epsilon", float, "shared", 1e-5, doc="a task vector entry counts when its magnitude exceeds this")

RAM = Method(
    name="ram",
    pretty_name="Reinforced Agent Merging",
    paper="https://arxiv.org/abs/2601.13572",
    inputs="a base_model and any number of fine-tunes of it",
    params=(_EPSILON,),
    base="required",
    kernel=_ram_kernel,
    scratch=lambda n: 6.0,
)

RAMPLUS_TL = Method(
    name="ramplus_tl",
    pretty_name="Reinforced Agent Merging Plus (Tensor-Local)",
    paper="https://arxiv.org/abs/2601.13572",
    inputs="a base_model and any number of fine-tunes of it",
    params=(
        Param("r", float, "shared", 0.1, doc="strength of the boost of a model's unique entries"),
        Param("alpha", float, "shared", 0.2, doc="cap of the shared/unique ratio used in the boost"),
        _EPSILON,
    ),
    base="required",
    kernel=_ramplus_kernel,
    scratch=lambda n: 6.0,
)
