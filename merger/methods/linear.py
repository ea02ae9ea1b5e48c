"""Per-entry combinations: the weighted average, NearSwap, and passthrough."""

from __future__ import annotations

import torch

from merger.errors import RecipeError
from merger.methods.base import REQUIRED, Interval, Method, Param
from merger.methods.blocks import Block, Job

_ZERO_WEIGHT_SUM = 1e-8


def _linear_kernel(job: Job) -> None:
    """Weighted average of the models ("model soups", https://arxiv.org/abs/2203.05482)."""
    indices = range(job.n)
    weights = job.values("weight", indices)
    total = None
    if job.params["normalize"]:
        total = float(torch.tensor(weights, dtype=torch.float32).sum())
        if abs(total) < _ZERO_WEIGHT_SUM:
            raise RecipeError(
                f"linear weights of {job.name or 'a tensor'} sum to zero, so they cannot be "
                "normalized; change the weights or set normalize: false"
            )

    def produce(block: Block) -> torch.Tensor:
        merged = torch.mul(block.tensors[0], weights[0], out=block.buffer("result"))
        for index in indices[1:]:
            merged.add_(block.tensors[index], alpha=weights[index])
        return merged if total is None else merged.div_(total)

    job.emit(produce)


LINEAR = Method(
    name="linear",
    pretty_name="Linear",
    paper="https://arxiv.org/abs/2203.05482",
    inputs="one or more models, each with a weight; a base_model, if given, is one more weighted input",
    params=(
        Param("weight", float, "input", REQUIRED, doc="weight of this model"),
        Param("normalize", bool, "shared", True, doc="divide by the sum of the weights"),
    ),
    base="ignored",
    kernel=_linear_kernel,
    scratch=lambda n: 1.0,
)


def _nearswap_kernel(job: Job) -> None:
    """NearSwap (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001).

    Move each base entry towards the other model by min(1, t / |base - other|): entries that are
    already close (within t) are swapped for the other model's, distant ones barely move.
    """
    (other,) = job.other_indices
    t = job.params["t"]

    def produce(block: Block) -> torch.Tensor:
        base = block.tensors[job.base_index]
        weight = torch.sub(base, block.tensors[other]).abs_().clamp_(min=1e-6)
        weight.reciprocal_().mul_(t).clamp_(0, 1)
        return torch.lerp(base, block.tensors[other], weight)

    job.emit(produce)


NEARSWAP = Method(
    name="nearswap",
    pretty_name="NearSwap",
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    inputs="exactly two models, one of them the base_model",
    params=(
        Param("t", float, "shared", REQUIRED, Interval(0.0, None),
              doc="distance below which an entry is taken from the other model"),
    ),
    base="required",
    kernel=_nearswap_kernel,
    scratch=lambda n: 2.0,
    min_models=2,
    max_models=2,
)


def _passthrough_kernel(job: Job) -> None:
    """Copy the single input, optionally scaled (used to stack layer slices)."""
    scale = job.model_params[0]["scale"]
    job.emit(lambda block: block.tensors[0].clone() if scale is None else block.tensors[0] * scale)


PASSTHROUGH = Method(
    name="passthrough",
    pretty_name="Passthrough",
    paper="https://github.com/arcee-ai/mergekit",
    inputs="exactly one model per tensor (slices pick which model and which layers)",
    params=(Param("scale", float, "input", None, doc="multiply the tensor by this"),),
    base="ignored",
    kernel=_passthrough_kernel,
    scratch=lambda n: 1.0,
    max_models=1,
)
