"""Interpolation on the sphere: slerp, nuslerp, multislerp and the Karcher mean."""

from __future__ import annotations

import math

import torch

from merger.errors import RecipeError
from merger.methods.base import REQUIRED, Interval, MergeInputs, Method, Param
from merger.methods.reduce import dot64, norm64, pair64

_SLERP_LINEAR_ABOVE = 0.9995  # |cos| above this: the angle is too small to divide by sin(angle)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from v0 (t=0) to v1 (t=1), one angle for the whole tensor.

    https://en.wikipedia.org/wiki/Slerp (Shoemake 1985). Falls back to linear interpolation when
    |cos(angle)| > 0.9995. The angle comes from a float64 dot product; the coefficients are float32
    like mergekit's.
    """
    norm0, norm1, dot = pair64(v0, v1)
    cos = dot / ((norm0 if norm0 > eps else 1.0) * (norm1 if norm1 > eps else 1.0))
    t32 = torch.tensor(t, dtype=torch.float32)
    cos32 = torch.tensor(cos, dtype=torch.float32).clamp(-1, 1)
    if abs(float(cos32)) > _SLERP_LINEAR_ABOVE:
        c0, c1 = 1 - t32, t32
    else:
        theta = torch.acos(cos32)
        sin_theta = torch.sin(theta)
        c0 = torch.sin((1 - t32) * theta) / sin_theta
        c1 = torch.sin(t32 * theta) / sin_theta
    return torch.mul(v0, float(c0)).add_(v1, alpha=float(c1))


def _slerp_kernel(inputs: MergeInputs) -> torch.Tensor:
    (other,) = inputs.other_indices
    return slerp(inputs.params["t"], inputs.base, inputs.tensors[other])


SLERP = Method(
    name="slerp",
    pretty_name="SLERP",
    paper="https://en.wikipedia.org/wiki/Slerp",
    inputs="exactly two models, one of them the base_model (t=0 gives the base, t=1 the other)",
    params=(
        Param("t", float, "shared", REQUIRED, Interval(0.0, 1.0), doc="position from base (0) to other (1)"),
    ),
    base="required",
    kernel=_slerp_kernel,
    min_models=2,
    max_models=2,
)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool) -> torch.Tensor:
    """Slerp with one angle per tensor (flatten), per row (default axis -1) or per column (row_wise).

    mergekit's NuSLERP: vectors are normalised with a 1e-7 floor, and only exactly (anti)parallel
    vectors (1 - cos^2 <= 1e-16) fall back to linear interpolation.
    """
    if flatten:
        norm0, norm1, dot = pair64(v0, v1)
        cos_value = dot / (max(norm0, 1e-7) * max(norm1, 1e-7))
        cos = torch.tensor(cos_value, dtype=torch.float32, device=v0.device).clamp_(-1, 1)
    else:
        dim = 0 if row_wise else -1
        norms = torch.linalg.vector_norm(v0, dim=dim, keepdim=True).clamp_(min=1e-7)
        norms.mul_(torch.linalg.vector_norm(v1, dim=dim, keepdim=True).clamp_(min=1e-7))
        cos = (v0 * v1).sum(dim=dim, keepdim=True).div_(norms).clamp_(-1, 1)
        del norms
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.where(colinear, 1, torch.sin(theta))
    c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return (v0 * c0).add_(v1 * c1)


def _nuslerp_kernel(inputs: MergeInputs) -> torch.Tensor:
    first, second = inputs.other_indices
    w0, w1 = inputs.values("weight", (first, second))
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    options = {"row_wise": inputs.params["nuslerp_row_wise"], "flatten": inputs.params["nuslerp_flatten"]}
    if inputs.base_index is None:
        return nuslerp(t, inputs.tensors[first], inputs.tensors[second], **options)
    base = inputs.base
    merged = nuslerp(t, inputs.tensors[first] - base, inputs.tensors[second] - base, **options)
    return merged.add_(base)


NUSLERP = Method(
    name="nuslerp",
    pretty_name="NuSLERP",
    paper="https://en.wikipedia.org/wiki/Slerp",
    inputs="exactly two models besides an optional base_model; with a base their task vectors are "
    "interpolated; t = weight_2 / (weight_1 + weight_2)",
    params=(
        Param("weight", float, "non_base", REQUIRED, doc="relative weight of this model"),
        Param("nuslerp_row_wise", bool, "shared", False, doc="one angle per vector along dim 0, not per row"),
        Param("nuslerp_flatten", bool, "shared", True, doc="one angle for the whole tensor"),
    ),
    base="optional",
    kernel=_nuslerp_kernel,
    min_others=2,
    max_others=2,
)


def _multislerp_kernel(inputs: MergeInputs) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere.

    https://goddard.blog/posts/multislerp-wow-what-a-cool-idea

    Directions are averaged with the weights and projected back to the sphere; the radius is the
    weighted mean of the norms. mergekit's tangent-space step at the weighted mean direction is
    zero by construction (sum_i w_i (u_i - (u_i.m) m) = M - |M| m = 0), so it is left out: the
    result is |.|-weighted-mean * M / |M| with M = sum_i w_i u_i.
    """
    others = inputs.other_indices
    if len(others) == 1:
        return inputs.tensors[others[0]].clone()
    weights = inputs.values("weight", others)
    if inputs.params["normalize_weights"]:
        total = float(torch.tensor(weights, dtype=torch.float32).sum())
        if total == 0:
            raise RecipeError(
                f"multislerp weights of {inputs.name or 'a tensor'} sum to zero; change them "
                "or set normalize_weights: false"
            )
        weights = [w / total for w in weights]
    eps = inputs.params["eps"]
    base = inputs.base if inputs.base_index is not None else None

    def vector(index: int) -> torch.Tensor:
        return inputs.tensors[index] - base if base is not None else inputs.tensors[index]

    norms = [norm64(vector(i)) for i in others]
    direction = torch.zeros_like(inputs.tensors[0])
    for index, weight, norm in zip(others, weights, norms):
        direction.add_(vector(index), alpha=weight / (norm + eps))
    direction_norm = norm64(direction)
    if direction_norm < eps:
        if len(others) != 2:
            raise RecipeError(
                f"multislerp: the weighted directions of {inputs.name or 'a tensor'} cancel out "
                "(antipodal inputs); change the weights"
            )
        merged = torch.mul(vector(others[0]), weights[0]).add_(vector(others[1]), alpha=weights[1])
    else:
        radius = sum(w * n for w, n in zip(weights, norms))
        merged = direction.mul_(radius / direction_norm)
    return merged.add_(base) if base is not None else merged


MULTISLERP = Method(
    name="multislerp",
    pretty_name="Multi-SLERP",
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    inputs="one or more models besides an optional base_model (the origin of the sphere); each "
    "non-base model takes a weight",
    params=(
        Param("weight", float, "non_base", REQUIRED, doc="barycentric weight of this model"),
        Param("normalize_weights", bool, "shared", True, doc="divide the weights by their sum"),
        Param("eps", float, "shared", 1e-8, Interval(0.0, None, low_open=True), doc="numerical floor"),
    ),
    base="optional",
    kernel=_multislerp_kernel,
    min_others=1,
)


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """Equal-weight Karcher (Riemannian) mean of the directions, scaled by the mean norm.

    Karcher 1977; for model merging https://arxiv.org/abs/2603.04972. Fixed-point iteration: step
    from the current mean along the weighted log-map average, stop when that step is below `tol`.
    Inputs with norm <= tol have no direction and only count towards the scale.
    """
    n = len(tensors)
    norms = [norm64(x) for x in tensors]
    valid = [i for i, norm in enumerate(norms) if norm > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    alpha = 1.0 / len(valid)
    mean = torch.zeros_like(tensors[0])
    for i in valid:
        mean.add_(tensors[i], alpha=alpha / norms[i])
    mean_norm = norm64(mean)
    if mean_norm < tol:
        mean = tensors[valid[0]] / norms[valid[0]]
    else:
        mean.div_(mean_norm)
    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        # tangent = sum_i alpha theta_i / sin(theta_i) (u_i - cos_i mean), with u_i = x_i / |x_i|
        tangent.zero_()
        along_mean = 0.0
        for i in valid:
            cos = min(1.0, max(-1.0, dot64(mean, tensors[i]) / norms[i]))
            theta = math.acos(cos)
            if theta < tol:
                continue
            coefficient = alpha * theta / math.sin(theta)
            tangent.add_(tensors[i], alpha=coefficient / norms[i])
            along_mean += coefficient * cos
        tangent.sub_(mean, alpha=along_mean)
        step = norm64(tangent)
        if step < tol:
            break
        mean.mul_(math.cos(step)).add_(tangent, alpha=math.sin(step) / step)
        mean_norm = norm64(mean)
        if mean_norm > tol:
            mean.div_(mean_norm)
    return mean.mul_(sum(norms) / n)


def _karcher_kernel(inputs: MergeInputs) -> torch.Tensor:
    if len(inputs.tensors) == 1:
        return inputs.tensors[0].clone()
    return karcher_mean(list(inputs.tensors), inputs.params["max_iter"], inputs.params["tol"])


KARCHER = Method(
    name="karcher",
    pretty_name="Karcher Mean",
    paper="https://arxiv.org/abs/2603.04972",
    inputs="one or more models, all weighted equally; a base_model, if given, is just another input",
    params=(
        Param("max_iter", int, "shared", 10, Interval(0, None), doc="fixed-point iterations at most"),
        Param("tol", float, "shared", 1e-5, Interval(0.0, None, low_open=True), doc="convergence tolerance"),
    ),
    base="ignored",
    kernel=_karcher_kernel,
)
