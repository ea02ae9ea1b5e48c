"""Interpolation on the sphere: slerp, nuslerp, multislerp and the Karcher mean."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from merger.errors import RecipeError
from merger.methods.base import REQUIRED, Interval, Method, Param
from merger.methods.blocks import Block, Job, Per, Sums, vector_sums

_SLERP_LINEAR_ABOVE = 0.9995  # |cos| above this: the angle is too small to divide by sin(angle)


def slerp_coefficients(t: float, norm0: float, norm1: float, dot: float, eps: float = 1e-8) -> tuple[float, float]:
    """(c0, c1) of slerp from v0 (t=0) to v1 (t=1) = c0 v0 + c1 v1, one angle for the whole tensor.

    https://en.wikipedia.org/wiki/Slerp (Shoemake 1985). Falls back to linear interpolation when
    |cos(angle)| > 0.9995. The angle comes from float64 sums; the coefficients are float32 like
    mergekit's.
    """
    cos = dot / ((norm0 if norm0 > eps else 1.0) * (norm1 if norm1 > eps else 1.0))
    t32 = torch.tensor(t, dtype=torch.float32)
    cos32 = torch.tensor(cos, dtype=torch.float32).clamp(-1, 1)
    if abs(float(cos32)) > _SLERP_LINEAR_ABOVE:
        return float(1 - t32), float(t32)
    theta = torch.acos(cos32)
    sin_theta = torch.sin(theta)
    return float(torch.sin((1 - t32) * theta) / sin_theta), float(torch.sin(t32 * theta) / sin_theta)


def _pair_sums(job: Job, first: Callable[[Block], torch.Tensor], second: Callable[[Block], torch.Tensor],
               per: Per = "total") -> Sums:
    """One sweep: sums of a.a, b.b and a.b (indices 0, 1, 2) for the vectors a = first(block), b = second(block)."""
    sums = Sums(job, 3, per)

    def visit(block: Block) -> None:
        a, b = first(block), second(block)
        sums.add(block, 0, a, a)
        sums.add(block, 1, b, b)
        sums.add(block, 2, a, b)

    job.sweep(visit)
    return sums


def _slerp_kernel(job: Job) -> None:
    (other,) = job.other_indices
    base = job.base_index
    aa, bb, ab = _pair_sums(job, lambda b: b.tensors[base], lambda b: b.tensors[other]).totals()
    c0, c1 = slerp_coefficients(job.params["t"], aa**0.5, bb**0.5, ab)
    job.emit(lambda b: torch.mul(b.tensors[base], c0, out=b.buffer("result")).add_(b.tensors[other], alpha=c1))


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
    scratch=lambda n: 1.0,
    min_models=2,
    max_models=2,
)


def _nuslerp_coefficients(t: float, aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 (c0, c1) per vector from float64 sums: mergekit's NuSLERP normalises with a 1e-7 floor
    and falls back to linear interpolation only for exactly (anti)parallel vectors (1 - cos^2 <= 1e-16)."""
    cos = (ab / (aa.sqrt().clamp(min=1e-7) * bb.sqrt().clamp(min=1e-7))).to(torch.float32).clamp_(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.where(colinear, 1, torch.sin(theta))
    c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return c0, c1


def _nuslerp_kernel(job: Job) -> None:
    """Slerp of two models (or of their task vectors when a base is given) with one angle per tensor
    (nuslerp_flatten), per row (the last axis, default) or per column (dim 0, nuslerp_row_wise)."""
    first, second = job.other_indices
    w0, w1 = job.values("weight", (first, second))
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    base = job.base_index
    ndim = len(job.shape)

    def vector(block: Block, index: int, key: str) -> torch.Tensor:
        if base is None:
            return block.tensors[index]
        return torch.sub(block.tensors[index], block.tensors[base], out=block.buffer(key))

    def pair(block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        return vector(block, first, "v0"), vector(block, second, "v1")

    flatten, by_column = job.params["nuslerp_flatten"], job.params["nuslerp_row_wise"] and ndim >= 2
    local = not flatten and not by_column and ndim > 2  # last-axis vectors lie inside a block's rows
    if not local:
        per: Per = "total" if flatten else "column" if by_column else "row"
        sums = _pair_sums(job, lambda b: vector(b, first, "v0"), lambda b: vector(b, second, "v1"), per)
        if flatten:
            aa, bb, ab = (torch.tensor(v, dtype=torch.float64) for v in sums.totals())
        else:
            aa, bb, ab = (sums.columns(i) if by_column else sums.rows(i) for i in range(3))
        c0, c1 = _nuslerp_coefficients(t, aa, bb, ab)

    def produce(block: Block) -> torch.Tensor:
        v0, v1 = pair(block)
        if local:
            k0, k1 = _nuslerp_coefficients(t, vector_sums(v0, v0), vector_sums(v1, v1), vector_sums(v0, v1))
            k0, k1 = k0.unsqueeze(-1), k1.unsqueeze(-1)
        elif flatten:
            k0, k1 = c0, c1
        elif by_column:
            k0, k1 = block.per_column(c0), block.per_column(c1)
        else:
            k0, k1 = block.per_row(c0), block.per_row(c1)
        merged = torch.mul(v0, k0, out=block.buffer("result")).add_(v1 * k1)
        return merged if base is None else merged.add_(block.tensors[base])

    job.emit(produce)


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
    scratch=lambda n: 5.0,
    min_others=2,
    max_others=2,
)


def _multislerp_kernel(job: Job) -> None:
    """Barycentric interpolation on the hypersphere.

    https://goddard.blog/posts/multislerp-wow-what-a-cool-idea

    Directions are averaged with the weights and projected back to the sphere; the radius is the
    weighted mean of the norms. mergekit's tangent-space step at the weighted mean direction is
    zero by construction (sum_i w_i (u_i - (u_i.m) m) = M - |M| m = 0), so it is left out: the
    result is |.|-weighted-mean * M / |M| with M = sum_i w_i u_i. |M| comes from the Gram matrix of
    the vectors (one sweep), so M is never held whole.
    """
    others = job.other_indices
    if len(others) == 1:
        job.emit(lambda block: block.tensors[others[0]].clone())
        return
    weights = job.values("weight", others)
    if job.params["normalize_weights"]:
        total = float(torch.tensor(weights, dtype=torch.float32).sum())
        if total == 0:
            raise RecipeError(
                f"multislerp weights of {job.name or 'a tensor'} sum to zero; change them "
                "or set normalize_weights: false"
            )
        weights = [w / total for w in weights]
    eps = job.params["eps"]
    base = job.base_index
    gram = _gram(job, others, base)
    norms = [gram[i][i] ** 0.5 for i in range(len(others))]
    scales = [w / (n + eps) for w, n in zip(weights, norms)]
    direction_norm = _combination_norm(gram, scales)
    if direction_norm < eps:
        if len(others) != 2:
            raise RecipeError(
                f"multislerp: the weighted directions of {job.name or 'a tensor'} cancel out "
                "(antipodal inputs); change the weights"
            )
        coefficients = weights
    else:
        radius = sum(w * n for w, n in zip(weights, norms))
        coefficients = [s * radius / direction_norm for s in scales]
    job.emit(lambda block: _combine(block, others, base, coefficients))


def _gram(job: Job, indices: list[int], base: int | None) -> list[list[float]]:
    """Float64 dot products between the vectors x_i (minus the base when given), in one sweep."""
    pairs = [(i, j) for i in range(len(indices)) for j in range(i, len(indices))]
    sums = Sums(job, len(pairs))

    def visit(block: Block) -> None:
        vectors = [block.tensors[i] if base is None else block.tensors[i] - block.tensors[base] for i in indices]
        for p, (i, j) in enumerate(pairs):
            sums.add(block, p, vectors[i], vectors[j])

    job.sweep(visit)
    gram = [[0.0] * len(indices) for _ in indices]
    for (i, j), value in zip(pairs, sums.totals()):
        gram[i][j] = gram[j][i] = value
    return gram


def _combination_norm(gram: list[list[float]], c: list[float]) -> float:
    """|sum_i c_i x_i| from the Gram matrix of the x_i."""
    square = sum(c[i] * c[j] * gram[i][j] for i in range(len(c)) for j in range(len(c)))
    return max(square, 0.0) ** 0.5


def _combine(block: Block, indices: list[int], base: int | None, coefficients: list[float]) -> torch.Tensor:
    """sum_i c_i (x_i - base) (+ base) for one block, in float32."""
    merged = block.buffer("result").zero_()
    vector = block.buffer("vector") if base is not None else None
    for index, c in zip(indices, coefficients):
        if vector is None:
            merged.add_(block.tensors[index], alpha=c)
        else:
            merged.add_(torch.sub(block.tensors[index], block.tensors[base], out=vector), alpha=c)
    return merged if base is None else merged.add_(block.tensors[base])


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
    scratch=lambda n: n + 2.0,
    min_others=1,
)


def karcher_coefficients(gram: list[list[float]], max_iter: int, tol: float) -> list[float]:
    """The equal-weight Karcher (Riemannian) mean of the directions of x_i, scaled by their mean norm,
    as coefficients c with mean = sum_i c_i x_i, from the Gram matrix of the x_i alone.

    Karcher 1977; for model merging https://arxiv.org/abs/2603.04972. Fixed-point iteration: step
    from the current mean along the weighted log-map average, stop when that step is below `tol`.
    Inputs with norm <= tol have no direction and only count towards the scale. Every iterate is a
    linear combination of the inputs, so the iteration runs on coefficients in float64 and the
    tensors are read twice (the Gram matrix, then the result), however many iterations it takes.
    """
    n = len(gram)
    norms = [max(gram[i][i], 0.0) ** 0.5 for i in range(n)]
    valid = [i for i, norm in enumerate(norms) if norm > tol]
    if not valid:
        return [0.0] * n
    alpha = 1.0 / len(valid)

    def dot(c: list[float], i: int) -> float:
        return sum(c[j] * gram[j][i] for j in range(n))

    mean = [alpha / norms[i] if i in valid else 0.0 for i in range(n)]
    mean_norm = _combination_norm(gram, mean)
    if mean_norm < tol:
        mean = [1 / norms[valid[0]] if i == valid[0] else 0.0 for i in range(n)]
    else:
        mean = [c / mean_norm for c in mean]
    for _ in range(max_iter):
        # tangent = sum_i alpha theta_i / sin(theta_i) (u_i - cos_i mean), with u_i = x_i / |x_i|
        tangent = [0.0] * n
        along_mean = 0.0
        for i in valid:
            cos = min(1.0, max(-1.0, dot(mean, i) / norms[i]))
            theta = math.acos(cos)
            if theta < tol:
                continue
            coefficient = alpha * theta / math.sin(theta)
            tangent[i] += coefficient / norms[i]
            along_mean += coefficient * cos
        tangent = [tc - along_mean * mc for tc, mc in zip(tangent, mean)]
        step = _combination_norm(gram, tangent)
        if step < tol:
            break
        mean = [mc * math.cos(step) + tc * math.sin(step) / step for mc, tc in zip(mean, tangent)]
        mean_norm = _combination_norm(gram, mean)
        if mean_norm > tol:
            mean = [c / mean_norm for c in mean]
    scale = sum(norms) / n
    return [c * scale for c in mean]


def _karcher_kernel(job: Job) -> None:
    indices = list(range(job.n))
    if job.n == 1:
        job.emit(lambda block: block.tensors[0].clone())
        return
    coefficients = karcher_coefficients(_gram(job, indices, None), job.params["max_iter"], job.params["tol"])
    job.emit(lambda block: _combine(block, indices, None, coefficients))


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
    scratch=lambda n: 3.0,
)
