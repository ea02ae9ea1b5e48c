"""Per-entry combinations: the weighted average, NearSwap, and passthrough."""

from __future__ import annotations

import torch

from merger.errors import RecipeError
from merger.methods.base import REQUIRED, Interval, MergeInputs, Method, Param

_ZERO_WEIGHT_SUM = 1e-8


def _linear_kernel(inputs: MergeInputs) -> torch.Tensor:
    """Weighted average of the models ("model soups", https://arxiv.org/abs/2203.05482)."""
    indices = range(len(inputs.tensors))
    weights = inputs.values("weight", indices)
    first = inputs.tensors[0]
    merged = torch.mul(first, weights[0], out=inputs.buffer("result", first.shape))
    for index in indices[1:]:
        merged.add_(inputs.tensors[index], alpha=weights[index])
    if inputs.params["normalize"]:
        total = float(torch.tensor(weights, dtype=torch.float32).sum())
        if abs(total) < _ZERO_WEIGHT_SUM:
            raise RecipeError(
                f"linear weights of {inputs.name or 'a tensor'} sum to zero, so they cannot be "
                "normalized; change the weights or set normalize: false"
            )
        merged.div_(total)
    return merged


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
)


def _nearswap_kernel(inputs: MergeInputs) -> torch.Tensor:
    """NearSwap (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001).

    Move each base entry towards the other model by min(1, t / |base - other|): entries that are
    already close (within t) are swapped for the other model's, distant ones barely move.
    """
    (other,) = inputs.other_indices
    base = inputs.base
    weight = torch.sub(base, inputs.tensors[other]).abs_().clamp_(min=1e-6)
    weight.reciprocal_().mul_(inputs.params["t"]).clamp_(0, 1)
    return torch.lerp(base, inputs.tensors[other], weight)


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
    min_models=2,
    max_models=2,
)


def _passthrough_kernel(inputs: MergeInputs) -> torch.Tensor:
    """Copy the single input, optionally scaled (used to stack layer slices)."""
    scale = inputs.model_params[0]["scale"]
    tensor = inputs.tensors[0]
    return tensor.clone() if scale is None else tensor * scale


PASSTHROUGH = Method(
    name="passthrough",
    pretty_name="Passthrough",
    paper="https://github.com/arcee-ai/mergekit",
    inputs="exactly one model per tensor (slices pick which model and which layers)",
    params=(Param("scale", float, "input", None, doc="multiply the tensor by this"),),
    base="ignored",
    kernel=_passthrough_kernel,
    max_models=1,
)
