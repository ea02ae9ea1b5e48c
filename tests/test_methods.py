"""Merge methods: float64 golden values from the papers' formulas, parity with mergekit 0.1.5, the
registry and parameter validation.

Tolerances: our kernels run in float32, so float64 goldens are compared with atol/rtol 1e-5 on
tensors of magnitude ~1; mergekit (also float32) is compared with atol 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch

from merger.errors import RecipeError
from merger.methods import METHODS, REQUIRED, MergeInputs, get_method
from merger.methods.sparsify import smallest_mask, sparsify_

SHAPE = (12, 20)
GOLDEN = {"atol": 1e-5, "rtol": 1e-5}
PARITY = {"atol": 1e-6, "rtol": 1e-6}


def _randn(seed: int, shape=SHAPE, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture(scope="module")
def models() -> list[torch.Tensor]:
    """A base and three fine-tunes (base + small task vectors), float32."""
    base = _randn(0)
    return [base] + [base + _randn(seed, scale=0.3) for seed in (1, 2, 3)]


def merge(name: str, tensors, base_index=None, params=None, model_params=None, seed=None, tensor_name="t"):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    inputs = MergeInputs(list(tensors), base_index, model_params or [], params or {}, tensor_name, generator)
    return METHODS[name].merge(inputs)


def per_model(base_index: int | None, n: int, **columns) -> list[dict]:
    """model_params with columns[name][j] for the j-th non-base input."""
    rows, j = [], 0
    for i in range(n):
        if i == base_index:
            rows.append({})
            continue
        rows.append({key: values[j] for key, values in columns.items()})
        j += 1
    return rows


# ---------------------------------------------------------------- float64 reference formulas


def ref_topk_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the max(1, int(density * n)) largest |delta| (inputs have no ties)."""
    flat = delta.flatten()
    k = max(1, int(density * flat.numel())) if density < 1 else flat.numel()
    out = torch.zeros_like(flat)
    keep = sorted(range(flat.numel()), key=lambda i: -abs(float(flat[i])))[:k]
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


def ref_breadcrumbs_trim(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop int(gamma n) largest |delta| and enough smallest to keep int(density n)."""
    flat = delta.flatten()
    n = flat.numel()
    kept, top = int(density * n), int(gamma * n)
    low = max(0, n - kept - top)
    order = sorted(range(n), key=lambda i: abs(float(flat[i])))
    out = torch.zeros_like(flat)
    keep = order[low : low + kept]
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


def ref_ties_combine(deltas, weights, normalize: bool) -> torch.Tensor:
    """Elect sign(sum_i w_i d_i) (0 -> +), keep agreeing w_i d_i, divide by agreeing weights."""
    weighted = [w * d for w, d in zip(weights, deltas)]
    elected = torch.sign(sum(weighted))
    elected[elected == 0] = 1
    numerator = torch.zeros_like(deltas[0])
    denominator = torch.zeros_like(deltas[0])
    for w, wd in zip(weights, weighted):
        agree = torch.sign(wd) == elected
        numerator += torch.where(agree, wd, 0)
        denominator += torch.where(agree, w, 0)
    denominator[denominator == 0] = 1
    return numerator / denominator if normalize else numerator


def ref_l1_rescale(original: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    before, after = original.abs().sum(), masked.abs().sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def ref_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    cos = float((a.flatten() @ b.flatten()) / (a.norm() * b.norm()))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


# ---------------------------------------------------------------- golden tests, one per method


def test_linear_is_normalized_weighted_mean(models):
    weights = [0.1, 0.5, 0.3, 0.7]
    got = merge("linear", models, None, {}, [{"weight": w} for w in weights])
    want = sum(w * m.double() for w, m in zip(weights, models)) / sum(weights)
    torch.testing.assert_close(got.double(), want, **GOLDEN)
    raw = merge("linear", models, None, {"normalize": False}, [{"weight": w} for w in weights])
    torch.testing.assert_close(raw.double(), want * sum(weights), **GOLDEN)


def test_linear_refuses_weights_summing_to_zero(models):
    with pytest.raises(RecipeError, match="sum to zero"):
        merge("linear", models[:2], None, {}, [{"weight": 1.0}, {"weight": -1.0}])


def test_slerp_one_angle_per_tensor(models):
    base, other = models[0], models[1]
    for t in (0.0, 0.3, 1.0):
        got = merge("slerp", [base, other], 0, {"t": t})
        torch.testing.assert_close(got.double(), ref_slerp(t, base, other), **GOLDEN)
    # the base may be listed second: t still runs from the base
    swapped = merge("slerp", [other, base], 1, {"t": 0.3})
    torch.testing.assert_close(swapped.double(), ref_slerp(0.3, base, other), **GOLDEN)


def test_slerp_falls_back_to_linear_when_nearly_colinear(models):
    base = models[0]
    close = base * 1.01 + 0.001 * _randn(9)  # cos ~ 0.99999
    cos = float(base.flatten() @ close.flatten() / (base.norm() * close.norm()))
    assert cos > 0.9995
    got = merge("slerp", [base, close], 0, {"t": 0.25})
    torch.testing.assert_close(got.double(), 0.75 * base.double() + 0.25 * close.double(), **GOLDEN)
    # just below the threshold the spherical formula applies and differs measurably from linear
    far = base + 0.05 * _randn(10)
    spherical = merge("slerp", [base, far], 0, {"t": 0.5}).double()
    torch.testing.assert_close(spherical, ref_slerp(0.5, base, far), **GOLDEN)
    assert (spherical - 0.5 * (base.double() + far.double())).abs().max() > 1e-4


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp(models, flatten, row_wise, with_base):
    w = (0.3, 0.6)
    t = w[1] / sum(w)
    base = models[0].double()
    a, b = models[1].double(), models[2].double()
    if with_base:
        a, b = a - base, b - base
    if flatten:
        va, vb = a.reshape(1, -1), b.reshape(1, -1)
    elif row_wise:  # mergekit's "row_wise" interpolates the vectors along dim 0 (columns)
        va, vb = a.T, b.T
    else:
        va, vb = a, b
    cos = (va * vb).sum(-1, keepdim=True) / (va.norm(dim=-1, keepdim=True) * vb.norm(dim=-1, keepdim=True))
    theta = torch.acos(cos)
    want = (torch.sin((1 - t) * theta) * va + torch.sin(t * theta) * vb) / torch.sin(theta)
    want = (want.T if row_wise and not flatten else want).reshape(SHAPE)
    if with_base:
        want = want + base
    tensors = models[:3] if with_base else models[1:3]
    options = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    got = merge("nuslerp", tensors, 0 if with_base else None, options,
                per_model(0 if with_base else None, len(tensors), weight=w))
    torch.testing.assert_close(got.double(), want, **GOLDEN)


@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_follows_tangent_space_recipe(models, with_base):
    """The blog post's steps, literally: project to the sphere, mean, tangent space, exp map back."""
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    base = models[0].double()
    vectors = torch.stack([m.double().flatten() - (base.flatten() if with_base else 0) for m in models[1:]])
    w = weights / weights.sum()
    norms = vectors.norm(dim=1, keepdim=True)
    units = vectors / norms
    mean = (units * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangents = units - (units @ mean)[:, None] * mean
    tangent = (tangents * w[:, None]).sum(0)
    size = tangent.norm()
    point = mean * torch.cos(size) + (tangent * torch.sin(size) / size if size > 0 else 0)
    want = (point * (norms.squeeze(1) * w).sum()).reshape(SHAPE) + (base if with_base else 0)
    tensors = models if with_base else models[1:]
    got = merge("multislerp", tensors, 0 if with_base else None, {},
                per_model(0 if with_base else None, len(tensors), weight=weights.tolist()))
    torch.testing.assert_close(got.double(), want, **GOLDEN)


def test_karcher_mean_zeroes_the_log_map_sum(models):
    got = merge("karcher", models[1:], None, {"max_iter": 50, "tol": 1e-9}).double()
    inputs = [m.double().flatten() for m in models[1:]]
    mean_norm = sum(x.norm() for x in inputs) / len(inputs)
    torch.testing.assert_close(got.norm(), mean_norm, **GOLDEN)
    m = got.flatten() / got.norm()
    log_sum = torch.zeros_like(m)
    for x in inputs:
        u = x / x.norm()
        theta = torch.acos((u @ m).clamp(-1, 1))
        log_sum += theta / torch.sin(theta) * (u - (u @ m) * m)
    assert log_sum.norm() < 1e-5  # the Karcher mean is the zero of the summed log maps


def test_task_arithmetic(models):
    weights = [0.5, 0.3, 0.7]
    base = models[0].double()
    deltas = [m.double() - base for m in models[1:]]
    got = merge("task_arithmetic", models, 0, {"lambda": 0.8}, per_model(0, 4, weight=weights))
    want = base + 0.8 * sum(w * d for w, d in zip(weights, deltas))
    torch.testing.assert_close(got.double(), want, **GOLDEN)
    normalized = merge("task_arithmetic", models, 0, {"normalize": True}, per_model(0, 4, weight=weights))
    want = base + sum(w * d for w, d in zip(weights, deltas)) / sum(weights)
    torch.testing.assert_close(normalized.double(), want, **GOLDEN)


@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.7), (1.0, -0.5, 0.0)])
def test_ties_trim_elect_disjoint_mean(models, weights):
    densities = (0.6, 0.5, 0.3)
    base = models[0].double()
    deltas = [ref_topk_trim(m.double() - base, d) for m, d in zip(models[1:], densities)]
    want = base + 0.9 * ref_ties_combine(deltas, weights, normalize=True)
    got = merge("ties", models, 0, {"lambda": 0.9}, per_model(0, 4, weight=weights, density=densities))
    torch.testing.assert_close(got.double(), want, **GOLDEN)


def test_ties_keeps_at_least_one_entry_and_rescales_on_request(models):
    base = models[0].double()
    deltas = [ref_topk_trim(m.double() - base, 1e-4) for m in models[1:3]]
    assert all(int((d != 0).sum()) == 1 for d in deltas)
    got = merge("ties", models[:3], 0, {}, per_model(0, 3, weight=(1.0, 1.0), density=(1e-4, 1e-4)))
    torch.testing.assert_close(got.double(), base + ref_ties_combine(deltas, (1.0, 1.0), True), **GOLDEN)
    raw = [m.double() - base for m in models[1:3]]
    scaled = [ref_l1_rescale(r, ref_topk_trim(r, 0.5)) for r in raw]
    params = per_model(0, 3, weight=(0.5, 0.5), density=(0.5, 0.5))
    got = merge("ties", models[:3], 0, {"rescale": True}, params)
    torch.testing.assert_close(got.double(), base + ref_ties_combine(scaled, (0.5, 0.5), True), **GOLDEN)


@pytest.mark.parametrize("method,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
def test_breadcrumbs(models, method, consensus):
    weights, densities, gammas = (0.5, 0.3, 0.7), (0.6, 0.9, 0.4), (0.05, 0.2, 0.01)
    base = models[0].double()
    deltas = [ref_breadcrumbs_trim(m.double() - base, d, g) for m, d, g in zip(models[1:], densities, gammas)]
    mixed = ref_ties_combine(deltas, weights, normalize=False) if consensus else sum(
        w * d for w, d in zip(weights, deltas))
    got = merge(method, models, 0, {}, per_model(0, 4, weight=weights, density=densities, gamma=gammas))
    torch.testing.assert_close(got.double(), base + mixed, **GOLDEN)


def _uniform_draws(seed: int, shapes) -> list[torch.Tensor]:
    """The draws a randomized kernel makes: one uniform tensor per non-base model, in order."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=generator).double() for shape in shapes]


@pytest.mark.parametrize("method,consensus", [("dare_linear", False), ("dare_ties", True)])
def test_dare_golden_from_the_same_draws(models, method, consensus):
    weights, densities = (0.5, 0.3, 0.7), (0.6, 0.5, 0.3)
    base = models[0].double()
    draws = _uniform_draws(7, [SHAPE] * 3)
    deltas = []
    for m, d, u in zip(models[1:], densities, draws):
        raw = m.double() - base
        deltas.append(ref_l1_rescale(raw, raw * (u < d)))
    mixed = ref_ties_combine(deltas, weights, normalize=False) if consensus else sum(
        w * d for w, d in zip(weights, deltas))
    got = merge(method, models, 0, {}, per_model(0, 4, weight=weights, density=densities), seed=7)
    torch.testing.assert_close(got.double(), base + mixed, **GOLDEN)


def test_dare_drop_fraction_and_rescale_statistics():
    shape = (400, 500)
    base = torch.zeros(shape)  # so that merged - base is exactly the rescaled task vector
    model = _randn(21, shape, scale=0.1)
    density = 0.3
    got = merge("dare_linear", [base, model], 0, {}, [{}, {"weight": 1.0, "density": density}], seed=1)
    delta, merged_delta = model - base, got - base
    kept = merged_delta != 0
    fraction = float(kept.float().mean())
    sigma = math.sqrt(density * (1 - density) / kept.numel())
    assert abs(fraction - density) < 5 * sigma
    ratio = merged_delta[kept] / delta[kept]  # one common rescale factor...
    assert float(ratio.max() - ratio.min()) < 1e-4
    # ...which restores the L1 norm, and so is 1/density up to sampling noise
    assert float(ratio.mean()) == pytest.approx(float(delta.abs().sum() / delta[kept].abs().sum()), rel=1e-5)
    assert float(ratio.mean()) == pytest.approx(1 / density, rel=0.02)
    no_rescale = merge("dare_linear", [base, model], 0, {"rescale": False},
                       [{}, {"weight": 1.0, "density": density}], seed=1)
    torch.testing.assert_close((no_rescale - base)[kept], delta[kept], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_randomized_methods_are_reproducible_from_the_seed_only(models, method):
    params = per_model(0, 4, weight=(0.5, 0.3, 0.7), density=(0.6, 0.5, 0.4))
    first = merge(method, models, 0, {}, params, seed=11)
    torch.manual_seed(123)  # the global RNG must play no part
    torch.rand(1000)
    again = merge(method, models, 0, {}, params, seed=11)
    other = merge(method, models, 0, {}, params, seed=12)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    with pytest.raises(ValueError, match="generator"):
        merge(method, models, 0, {}, params)


@pytest.mark.parametrize("method,consensus", [("della_linear", False), ("della", True)])
def test_della_rank_probabilities_golden(models, method, consensus):
    weights, densities, epsilons = (0.5, 0.3, 0.7), (0.6, 0.5, 0.4), (0.15, 0.3, 0.1)
    base = models[0].double()
    draws = _uniform_draws(5, [SHAPE] * 3)
    deltas = []
    for m, d, e, u in zip(models[1:], densities, epsilons, draws):
        raw = m.double() - base
        ranks = raw.abs().argsort(dim=1).argsort(dim=1).double()  # 0 = smallest |delta| in its row
        probs = (d - e) + 2 * e * ranks / (SHAPE[1] - 1)
        deltas.append(ref_l1_rescale(raw, raw * (u < probs)))
    mixed = ref_ties_combine(deltas, weights, normalize=True) if consensus else sum(
        w * d for w, d in zip(weights, deltas))
    params = per_model(0, 4, weight=weights, density=densities, epsilon=epsilons)
    got = merge(method, models, 0, {}, params, seed=5)
    torch.testing.assert_close(got.double(), base + mixed, **GOLDEN)


def test_della_keeps_large_magnitudes_more_often():
    shape = (200, 1000)
    base = torch.zeros(shape)
    model = torch.linspace(0.001, 1, 1000).repeat(200, 1)  # |delta| grows along each row
    got = merge("della_linear", [base, model], 0, {"rescale": False},
                [{}, {"weight": 1.0, "density": 0.5, "epsilon": 0.4}], seed=3)
    kept = (got != 0).float().mean(dim=0)
    assert float(kept[:100].mean()) == pytest.approx(0.1 + 0.8 * 0.05, abs=0.02)
    assert float(kept[-100:].mean()) == pytest.approx(0.9 - 0.8 * 0.05, abs=0.02)


@pytest.mark.parametrize("select_topk", [1.0, 0.4])
def test_sce(models, select_topk):
    base = models[0].double()
    vectors = torch.stack([m.double() - base for m in models[1:]])
    if select_topk < 1:
        variance = vectors.var(dim=0, unbiased=False).flatten()
        k = int(int((variance != 0).sum()) * select_topk)
        keep = torch.zeros_like(variance)
        keep[variance.argsort(descending=True)[:k]] = 1
        vectors = vectors * keep.reshape(SHAPE)
    weights = vectors.square().mean(dim=(1, 2))
    weights = weights / weights.sum()
    elected = torch.sign(vectors.sum(0))
    elected[elected == 0] = 1
    agree = torch.sign(vectors) == elected
    w = weights[:, None, None] * agree
    want = base + (vectors * w).sum(0) / w.sum(0).clamp(min=1e-6)
    got = merge("sce", models, 0, {"select_topk": select_topk})
    torch.testing.assert_close(got.double(), want, **GOLDEN)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_ratio(models, filter_wise):
    base = models[0].double()
    deltas = [m.double() - base for m in models[1:]]
    k = len(deltas)
    axis = -1 if filter_wise else None

    def cosine(a, b):
        if axis is None:
            return (a * b).sum() / (a.norm() * b.norm())
        return (a * b).sum(axis) / (a.norm(dim=axis) * b.norm(dim=axis))

    cos = sum(cosine(deltas[i], deltas[j]) for i in range(k) for j in range(i + 1, k)) / (k * (k - 1) / 2)
    t = k * cos / (1 + (k - 1) * cos)
    if filter_wise:
        t = t[:, None]
    want = t * sum(m.double() for m in models[1:]) / k + (1 - t) * base
    got = merge("model_stock", models, 0, {"filter_wise": filter_wise})
    torch.testing.assert_close(got.double(), want, **GOLDEN)


def test_model_stock_keeps_base_where_ratio_is_singular(models):
    base = models[0]
    delta = _randn(4, scale=0.3)
    got = merge("model_stock", [base, base + delta, base - delta], 0, {})  # cos = -1: 1 + cos = 0
    torch.testing.assert_close(got, base, atol=0, rtol=0)


def test_nearswap(models):
    base, other = models[0].double(), models[1].double()
    t = 0.2
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    want = weight * other + (1 - weight) * base
    torch.testing.assert_close(merge("nearswap", models[:2], 0, {"t": t}).double(), want, **GOLDEN)


def test_passthrough(models):
    assert torch.equal(merge("passthrough", models[:1], None, {}), models[0])
    torch.testing.assert_close(merge("passthrough", models[:1], None, {}, [{"scale": 0.5}]), models[0] * 0.5)


# ---------------------------------------------------------------- shared properties


@pytest.mark.parametrize("name", sorted(METHODS))
def test_inputs_are_not_modified_and_output_is_float32(models, name):
    method = METHODS[name]
    copies = [m.clone() for m in models]
    n = {"slerp": 2, "nearswap": 2, "passthrough": 1, "nuslerp": 3, "arcee_fusion": 2}.get(name, 4)
    base_index = None if method.base == "ignored" else 0
    values = {"weight": 0.4, "density": 0.5}
    model_params = [{k: v for k, v in values.items() if k in method.param_names} for _ in range(n)]
    if method.base == "ignored" and "weight" not in method.param_names:
        model_params = []
    params = {"t": 0.3} if "t" in method.param_names else {}
    out = merge(name, models[:n], base_index, params, model_params, seed=0 if method.randomized else None)
    assert out.dtype == torch.float32 and out.shape == models[0].shape
    assert all(torch.equal(a, b) for a, b in zip(models, copies))


@pytest.mark.parametrize("name", ["ties", "dare_ties", "della", "breadcrumbs_ties", "sce"])
def test_int8_mask_does_not_change_results(models, name):
    keys = {"weight", "density"} & METHODS[name].param_names
    model_params = per_model(0, 4, **{k: (0.5, 0.4, 0.6) for k in keys})
    a = merge(name, models, 0, {"int8_mask": True}, model_params, seed=1)
    b = merge(name, models, 0, {"int8_mask": False}, model_params, seed=1)
    assert torch.equal(a, b)


def test_task_arithmetic_family_returns_base_without_other_models(models):
    for name in ("task_arithmetic", "ties", "dare_ties", "sce"):
        assert torch.equal(merge(name, models[:1], 0, {}, seed=0), models[0])


def test_zero_weight_model_does_not_count(models):
    params = per_model(0, 4, weight=(0.5, 0.0, 0.7), density=(0.6, 0.5, 0.3))
    with_zero = merge("ties", models, 0, {}, params)
    without = merge("ties", [models[0], models[1], models[3]], 0, {},
                    per_model(0, 3, weight=(0.5, 0.7), density=(0.6, 0.3)))
    torch.testing.assert_close(with_zero, without, atol=0, rtol=0)


def test_magnitude_selection_with_ties_is_exact_and_deterministic():
    values = torch.randint(-3, 4, (50, 40), generator=torch.Generator().manual_seed(0)).float()
    k = int(0.37 * values.numel())
    kept = sparsify_(values.clone(), "magnitude", 0.37) != 0  # the top k are all non-zero here
    assert int(kept.sum()) == k
    assert values[kept].abs().min() >= values[~kept].abs().max()
    mask = smallest_mask(values.abs(), 700)
    assert int(mask.sum()) == 700 and values.abs()[mask].max() <= values.abs()[~mask].min()
    assert torch.equal(mask, smallest_mask(values.abs(), 700))
    n = values.numel()
    below_outliers = smallest_mask(values.abs(), n - int(0.2 * n))
    window = below_outliers & ~smallest_mask(values.abs(), n - int(0.2 * n) - int(0.5 * n))
    assert int(window.sum()) == int(0.5 * n)
    kept = sparsify_(values.clone(), "magnitude_outliers", 0.5, gamma=0.2)
    assert torch.equal(kept, values * window)


# ---------------------------------------------------------------- parity with mergekit 0.1.5

# mergekit is a test requirement (requirements-test.txt): imported plainly, so a missing reference is an error.
from mergekit.merge_methods import registry as mergekit_registry  # noqa: E402
from mergekit.merge_methods.base import BasePolicy, ParameterScope, TensorGroup  # noqa: E402
from mergekit.merge_methods.generalized_task_arithmetic import get_mask  # noqa: E402
from mergekit.merge_methods.slerp import slerp as mk_slerp  # noqa: E402
from mergekit.sparsify import RescaleNorm, SparsificationMethod  # noqa: E402
from mergekit.sparsify import sparsify as mk_sparsify  # noqa: E402


def mergekit_merge(name, tensors, base_index, params=None, model_params=None):
    """Run mergekit's method on the same tensors; per-model values become lists."""
    group = TensorGroup.from_tensors(tensors, base_index=base_index)
    parameters = dict(params or {})
    for key in {k for row in (model_params or []) for k in row}:
        parameters[key] = [row[key] for row in model_params if key in row]
    return mergekit_registry.get(name)((group,), parameters=parameters)[0]


PARITY_CASES = [
    ("linear", None, {}, "input", {"weight": (0.1, 0.5, 0.3, 0.7)}),
    ("linear", None, {"normalize": False}, "input", {"weight": (0.1, 0.5, -0.3, 0.7)}),
    ("task_arithmetic", 0, {}, "non_base", {"weight": (0.5, 0.3, 0.7)}),
    ("task_arithmetic", 0, {"normalize": True, "lambda": 1.3}, "non_base", {"weight": (0.5, 0.3, 0.7)}),
    ("ties", 0, {}, "non_base", {"weight": (0.5, 0.3, 0.7), "density": (0.6, 0.5, 0.3)}),
    ("ties", 2, {"rescale": True, "lambda": 0.8, "normalize": False}, "non_base",
     {"weight": (0.5, -0.3, 0.7), "density": (0.6, 0.5, 0.3)}),
    ("breadcrumbs", 0, {}, "non_base",
     {"weight": (0.5, 0.3, 0.7), "density": (0.6, 0.9, 0.4), "gamma": (0.05, 0.2, 0.0)}),
    ("breadcrumbs_ties", 0, {"normalize": True, "rescale": True}, "non_base",
     {"weight": (0.5, 0.3, 0.7), "density": (0.6, 0.9, 0.4), "gamma": (0.05, 0.2, 0.01)}),
    ("sce", 0, {}, None, {}),
    ("sce", 0, {"select_topk": 0.4}, None, {}),
    ("model_stock", 0, {}, None, {}),
    ("model_stock", 0, {"filter_wise": True}, None, {}),
    ("karcher", None, {}, None, {}),
    ("karcher", None, {"max_iter": 3, "tol": 1e-3}, None, {}),
    ("multislerp", 0, {}, "non_base", {"weight": (0.2, 0.5, 0.3)}),
    ("multislerp", None, {"normalize_weights": False}, "input", {"weight": (0.2, 0.5, 0.3, 0.1)}),
]


@pytest.mark.parametrize("name,base_index,params,scope,columns", PARITY_CASES)
def test_parity_with_mergekit(models, name, base_index, params, scope, columns):
    n = len(models)
    if scope == "input":
        model_params = [{k: v[i] for k, v in columns.items()} for i in range(n)]
    else:
        model_params = per_model(base_index, n, **columns)
    ours = merge(name, models, base_index, params, model_params)
    theirs = mergekit_merge(name, models, base_index, params, model_params)
    torch.testing.assert_close(ours, theirs, **PARITY)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 1.0])
@pytest.mark.parametrize("closeness", [0.3, 1e-3])
def test_slerp_parity(models, t, closeness):
    base = models[0]
    other = base + closeness * _randn(5)
    ours = merge("slerp", [base, other], 0, {"t": t})
    theirs = mk_slerp(torch.tensor([t]), base[None], other[None])[0]
    torch.testing.assert_close(ours, theirs, **PARITY)


@pytest.mark.parametrize("options", [
    {"nuslerp_flatten": True},
    {"nuslerp_flatten": False},
    {"nuslerp_flatten": False, "nuslerp_row_wise": True},
])
@pytest.mark.parametrize("base_index", [None, 0])
def test_nuslerp_and_nearswap_parity(models, options, base_index):
    tensors = models[:3] if base_index == 0 else models[1:3]
    model_params = per_model(base_index, len(tensors), weight=(0.3, 0.6))
    ours = merge("nuslerp", tensors, base_index, options, model_params)
    theirs = mergekit_merge("nuslerp", tensors, base_index, options, model_params)
    torch.testing.assert_close(ours, theirs, **PARITY)
    for t in (1e-3, 0.2):
        ours = merge("nearswap", models[:2], 0, {"t": t})
        torch.testing.assert_close(ours, mergekit_merge("nearswap", models[:2], 0, {"t": t}), **PARITY)


@pytest.mark.parametrize("method,ours_name", [
    (SparsificationMethod.magnitude, "magnitude"),
    (SparsificationMethod.magnitude_outliers, "magnitude_outliers"),
])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.35, 0.9, 1.0])
@pytest.mark.parametrize("rescale", [False, True])
def test_sparsify_parity(method, ours_name, density, rescale):
    delta = _randn(8, (30, 17))
    theirs = mk_sparsify(delta, density, method, gamma=0.1, rescale_norm=RescaleNorm.l1 if rescale else None)
    ours = sparsify_(delta.clone(), ours_name, density, gamma=0.1, rescale=rescale)
    torch.testing.assert_close(ours, theirs, **PARITY)


def test_sign_consensus_parity():
    from merger.methods.task_arithmetic import erase_disagreeing_

    deltas = _randn(6, (4, 50))
    deltas[:, :5] = 0  # zeros never agree
    ours = erase_disagreeing_(deltas.clone()) != 0
    assert torch.equal(ours, get_mask(deltas, method="sum"))


@pytest.mark.parametrize("name,consensus", [
    ("dare_ties", True), ("dare_linear", False), ("della", True), ("della_linear", False),
])
def test_randomized_parity_with_mergekit_given_the_same_draws(models, monkeypatch, name, consensus):
    """mergekit draws with torch.bernoulli from the global RNG; replace that with our stream."""
    stream = torch.Generator().manual_seed(99)
    monkeypatch.setattr(torch, "bernoulli", lambda p: (torch.rand(p.shape, generator=stream) < p).to(p.dtype))
    columns = {"weight": (0.5, 0.3, 0.7), "density": (0.6, 0.5, 0.4)}
    if name.startswith("della"):
        columns["epsilon"] = (0.15, 0.3, 0.1)
    model_params = per_model(0, 4, **columns)
    theirs = mergekit_merge(name, models, 0, {}, model_params)
    ours = merge(name, models, 0, {}, model_params, seed=99)
    torch.testing.assert_close(ours, theirs, **PARITY)


_BASE_POLICY = {
    BasePolicy.REQUIRED: "required", BasePolicy.OPTIONAL: "optional", BasePolicy.IGNORED: "ignored",
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_spec_matches_mergekit(name):
    spec = mergekit_registry.get(name).spec
    ours = METHODS[name]
    assert [p.name for p in ours.params] == [p.name for p in spec.parameters]
    for p, q in zip(ours.params, spec.parameters):
        assert p.scope == q.scope.value
        assert p.required == q.required and (p.required or p.default == q.default)
    contract = spec.contract
    assert ours.base == _BASE_POLICY[contract.base]
    assert (ours.min_models, ours.max_models) == (contract.min_inputs, contract.max_inputs)
    assert (ours.min_others, ours.max_others) == (contract.min_non_base or 0, contract.max_non_base)
    assert ours.paper.startswith("https://")


def test_scope_vocabulary_matches_mergekit():
    assert {s.value for s in ParameterScope} == {"shared", "input", "non_base"}


# ---------------------------------------------------------------- registry and validation


@pytest.mark.parametrize("typo,suggestion", [
    ("dare-ties", "dare_ties"), ("TIES", "ties"), ("slurp", "slerp"), ("model-stock", "model_stock"),
    ("della linear", "della_linear"), ("task_arithmatic", "task_arithmetic"),
])
def test_get_method_suggests_the_closest_name(typo, suggestion):
    with pytest.raises(RecipeError, match=f"did you mean '{suggestion}'"):
        get_method(typo)


def test_get_method_lists_known_names_when_nothing_is_close():
    assert get_method("ties") is METHODS["ties"]
    with pytest.raises(RecipeError, match="mergekit 0.1.5's methods, all supported here, are: arcee_fusion, breadcrumbs, "):
        get_method("frankenstein")


@pytest.mark.parametrize("method,param,value,problem", [
    ("ties", "density", 1.5, "density must be in (0, 1], got 1.5"),
    ("ties", "density", -0.1, "density must be in (0, 1]"),
    ("ties", "density", 0, "density must be in (0, 1], got 0"),
    ("ties", "weight", float("nan"), "weight must be a finite number"),
    ("ties", "weight", "0.5", "weight must be a number"),
    ("ties", "normalize", "yes", "normalize must be true or false"),
    ("ties", "normalize", 2, "normalize must be true or false"),
    ("slerp", "t", 1.2, "t must be in [0, 1], got 1.2"),
    ("nearswap", "t", -0.1, "t must be in [0, inf)"),
    ("della", "epsilon", 0.5, "epsilon must be in [0, 0.5), got 0.5"),
    ("breadcrumbs", "gamma", 1.1, "gamma must be in [0, 1]"),
    ("karcher", "max_iter", 2.5, "max_iter must be a whole number"),
    ("karcher", "tol", 0, "tol must be in (0, inf)"),
    ("sce", "select_topk", 0, None),
    ("ties", "int8_mask", 1.0, None),
    ("karcher", "max_iter", 10.0, None),
    ("ties", "weight", -2, None),
    ("passthrough", "scale", None, None),
    ("ties", "weight", None, "weight must be set to a float"),
])
def test_param_validation(method, param, value, problem):
    found = get_method(method).param(param).validate(value)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem)


def test_param_coercion():
    method = get_method("ties")
    assert method.param("int8_mask").coerce(1.0) is True
    assert method.param("normalize").coerce(0) is False
    assert isinstance(method.param("weight").coerce(1), float)
    assert get_method("karcher").param("max_iter").coerce(10.0) == 10
    with pytest.raises(RecipeError, match="density must be in"):
        method.param("density").coerce(2)


def test_unknown_parameter_names_are_refused(models):
    with pytest.raises(RecipeError, match="ties has no parameter 'densty'; it accepts: int8_mask"):
        get_method("ties").param("densty")
    with pytest.raises(RecipeError, match="does not take densty"):
        merge("ties", models, 0, {}, per_model(0, 4, weight=(1, 1, 1), densty=(1, 1, 1)))
    with pytest.raises(RecipeError, match="does not take weight"):
        merge("ties", models, 0, {"weight": 0.5}, per_model(0, 4, weight=(1, 1, 1)))


def test_base_values_it_does_not_take_are_ignored(models):
    """Shared recipes often give the base a weight/density; mergekit ignores them, so do we."""
    params = per_model(0, 4, weight=(0.5, 0.3, 0.7), density=(0.6, 0.5, 0.3))
    with_base_values = [{"weight": 1.0, "density": 1.0}] + params[1:]
    assert torch.equal(merge("ties", models, 0, {}, params), merge("ties", models, 0, {}, with_base_values))


def test_missing_required_parameter(models):
    with pytest.raises(RecipeError, match="ties needs parameter weight \\(tensor t\\)"):
        merge("ties", models, 0, {}, [])
    with pytest.raises(RecipeError, match="slerp needs parameter t"):
        merge("slerp", models[:2], 0, {})


def test_defaults_fill_in(models):
    explicit = merge("ties", models, 0, {"normalize": True, "lambda": 1.0, "rescale": False},
                     per_model(0, 4, weight=(0.5, 0.3, 0.7), density=(1.0, 1.0, 1.0)))
    implicit = merge("ties", models, 0, {}, per_model(0, 4, weight=(0.5, 0.3, 0.7)))
    assert torch.equal(explicit, implicit)
    assert get_method("della").param("epsilon").default == 0.15
    assert get_method("ties").param("weight").default is REQUIRED


@pytest.mark.parametrize("name,n,has_base,problem", [
    ("slerp", 3, True, "slerp takes at most 2 models"),
    ("slerp", 2, False, "slerp needs a base_model"),
    ("ties", 3, False, "ties needs a base_model"),
    ("model_stock", 2, True, "model_stock needs at least 3 models"),
    ("nuslerp", 4, True, "nuslerp takes at most 2 models besides the base"),
    ("nuslerp", 1, False, "nuslerp needs at least 2 models besides the base"),
    ("passthrough", 2, False, "passthrough takes at most 1 models"),
    ("multislerp", 1, True, "multislerp needs at least 1 models besides the base"),
    ("linear", 3, True, None),
    ("karcher", 2, True, None),
    ("nuslerp", 2, False, None),
])
def test_input_contracts(name, n, has_base, problem):
    found = get_method(name).check_inputs(n, has_base)
    assert found == problem if problem is None else found.startswith(problem)


def test_della_epsilon_constraint(models):
    method = get_method("della")
    problem = method.check_values({"density": 0.9, "epsilon": 0.15})
    assert problem.startswith("della needs density - epsilon > 0")
    assert method.check_values({"density": 0.5, "epsilon": 0.15}) is None
    assert method.check_values({"density": 1.0, "epsilon": 0.15}) is None  # no pruning at all
    with pytest.raises(RecipeError, match="della needs density - epsilon > 0 and density \\+ epsilon < 1"):
        merge("della", models[:2], 0, {}, [{}, {"weight": 1.0, "density": 0.1, "epsilon": 0.2}], seed=0)


def test_normalize_refuses_weights_summing_to_zero(models):
    params = per_model(0, 3, weight=(1.0, -1.0))
    with pytest.raises(RecipeError, match="sum to zero and normalize is true"):
        merge("task_arithmetic", models[:3], 0, {"normalize": True}, params)
    zero = merge("task_arithmetic", models[:3], 0, {"normalize": True}, per_model(0, 3, weight=(0.0, 0.0)))
    assert torch.equal(zero, models[0])  # all-zero weights: nothing to add, as in mergekit


def test_ties_zero_sum_elects_positive_sign(models):
    """Opposite task vectors of equal weight sum to zero everywhere: the + sign wins each entry."""
    base = torch.zeros(SHAPE)  # so that the task vectors are exactly +delta and -delta
    delta = _randn(12, scale=0.3)
    got = merge("ties", [base, delta, -delta], 0, {}, per_model(0, 3, weight=(0.5, 0.5)))
    assert torch.equal(got, delta.abs())


@pytest.mark.parametrize("kind", ["normal", "fp16-ties", "constant", "sorted", "two-values"])
@pytest.mark.parametrize("q", [1e-6, 0.2, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("block", [None, 250_000])
def test_exact_selection_equals_a_full_kthvalue(kind: str, q: float, block: int | None) -> None:
    """The two-sweep histogram selection over blocks gives exactly torch.kthvalue's k-th magnitude."""
    from merger.methods.sparsify import kth_smallest

    g = torch.Generator().manual_seed(3)
    n = 2_000_003
    flat = {
        "normal": lambda: torch.randn(n, generator=g),
        "fp16-ties": lambda: torch.randn(n, generator=g).half().float(),
        "constant": lambda: torch.full((n,), 0.25),
        "sorted": lambda: torch.linspace(-1, 1, n),
        "two-values": lambda: (torch.rand(n, generator=g) < 0.5).float(),
    }[kind]().abs()
    k = max(1, int(q * n))
    assert kth_smallest(flat, k, block) == float(torch.kthvalue(flat, k).values)


def test_smallest_mask_on_a_large_tied_tensor_matches_a_stable_sort() -> None:
    from merger.methods.sparsify import smallest_mask

    g = torch.Generator().manual_seed(4)
    scores = torch.randn(1_500, 1_400, generator=g).half().float().abs()  # many exact ties
    k = scores.numel() // 3
    expected = torch.zeros(scores.numel(), dtype=torch.bool)
    expected[torch.sort(scores.reshape(-1), stable=True).indices[:k]] = True
    mask = smallest_mask(scores, k)
    assert int(mask.sum()) == k and torch.equal(mask.reshape(-1), expected)
