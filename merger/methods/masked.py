"""Methods that keep a fine-tune's change only where a mask says so: Arcee Fusion, RAM and RAM+.

Arcee Fusion (https://arcee.ai) merges a base and one model: an entry takes the model's value where
its importance |model - base| * KL(softmax(model) || softmax(base)) (the KL divergence of each row,
along the last dimension) reaches median + 1.5 * IQR of all importances, and the base's value
elsewhere. The quartiles are order statistics at floor(q * (n - 1)); mergekit 0.1.5 estimates them
from a random sample of 10^6 entries on larger tensors, here they are exact on every tensor.

RAM, Reinforced Agent Merging (https://arxiv.org/abs/2601.13572): an entry's task vector entries
whose magnitude exceeds epsilon count as contributions; entries one model alone changed keep that
model's change, entries several models changed take the mean of their changes. RAM+ (tensor-local)
scales each model's unique entries by 1 + r * min(alpha, shared / unique), where shared and unique
count that model's contributions in the tensor that other models also changed, or it alone changed.
"""

from __future__ import annotations

import torch

from merger.methods.base import MergeInputs, Method, Param
from merger.methods.sparsify import kth_smallest

_KL_EPS = 1e-8  # added to both distributions before the log, as mergekit does
_QUARTILES = (0.25, 0.5, 0.75)


def _order_statistic(flat: torch.Tensor, q: float) -> torch.Tensor:
    """The entry at position floor(q * (n - 1)) of the sorted values (q * (n - 1) in float32)."""
    n = flat.numel()
    position = int(torch.tensor(q, dtype=torch.float32) * (n - 1))
    return kth_smallest(flat, position + 1)


def _fusion_kernel(inputs: MergeInputs) -> torch.Tensor:
    base = inputs.base
    (other,) = inputs.other_indices
    model = inputs.tensors[other]
    delta = torch.sub(model, base, out=inputs.buffer("result", base.shape))
    p = torch.softmax(model, dim=-1).add_(_KL_EPS)
    q = torch.softmax(base, dim=-1).add_(_KL_EPS)
    kl = torch.div(p, q).log_().mul_(p).sum(dim=-1, keepdim=True)
    del p, q
    importance = delta.abs().mul_(kl)
    flat = importance.reshape(-1)
    q1, median, q3 = (_order_statistic(flat, q) for q in _QUARTILES)
    threshold = median + 1.5 * (q3 - q1)
    delta.mul_(importance >= threshold)
    return delta.add_(base)


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
)


def _contributions(inputs: MergeInputs, epsilon: float) -> tuple[list[int], torch.Tensor]:
    """The non-base indices and, per entry, how many of them changed it by more than epsilon."""
    others = inputs.other_indices
    counts = torch.zeros(inputs.base.shape, dtype=torch.int32, device=inputs.base.device)
    for i in others:
        counts += torch.sub(inputs.tensors[i], inputs.base).abs_() > epsilon
    return others, counts


def _ram(inputs: MergeInputs, plus: bool) -> torch.Tensor:
    base = inputs.base
    epsilon = inputs.params["epsilon"]
    others, counts = _contributions(inputs, epsilon)
    unique = counts == 1
    overlap = counts > 1
    divisor = counts.clamp(min=1).float()
    merged = torch.zeros_like(base)
    for i in others:
        delta = torch.sub(inputs.tensors[i], base)
        contributes = delta.abs() > epsilon
        delta.mul_(contributes)
        own = delta * unique
        if plus:  # float32 scalars, as mergekit computes them
            shared_count = (contributes & overlap).sum()
            unique_count = (contributes & unique).sum()
            rho = shared_count / unique_count.clamp(min=epsilon)
            own *= 1 + inputs.params["r"] * rho.clamp(min=0, max=inputs.params["alpha"])
        merged += own + delta * overlap / divisor
    return merged.add_(base)


def _ram_kernel(inputs: MergeInputs) -> torch.Tensor:
    return _ram(inputs, plus=False)


def _ramplus_kernel(inputs: MergeInputs) -> torch.Tensor:
    return _ram(inputs, plus=True)


_EPSILON = Param("epsilon", float, "shared", 1e-5, doc="a task vector entry counts when its magnitude exceeds this")

RAM = Method(
    name="ram",
    pretty_name="Reinforced Agent Merging",
    paper="https://arxiv.org/abs/2601.13572",
    inputs="a base_model and any number of fine-tunes of it",
    params=(_EPSILON,),
    base="required",
    kernel=_ram_kernel,
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
)
