"""arcee_fusion, ram and ramplus_tl: float64 goldens written from the formulas entry by entry, and
parity with mergekit 0.1.5's own kernels on the same tensors.

Tolerances as in test_methods.py: our kernels run in float32, so float64 goldens are compared with
atol/rtol 1e-5 on tensors of magnitude ~1; mergekit (also float32) with atol/rtol 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch

from merger.methods import METHODS, MergeInputs
from mergekit.merge_methods import registry as mergekit_registry
from mergekit.merge_methods.base import TensorGroup

GOLDEN = {"atol": 1e-5, "rtol": 1e-5}
PARITY = {"atol": 1e-6, "rtol": 1e-6}


def _randn(seed: int, shape=(12, 20), scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def sparse_finetunes(shape=(12, 20), n: int = 3) -> list[torch.Tensor]:
    """A base and n fine-tunes that each change a random ~40% of the entries (so some entries are
    changed by one model, some by several, some by none)."""
    base = _randn(0, shape)
    out = [base]
    for seed in range(1, n + 1):
        g = torch.Generator().manual_seed(100 + seed)
        mask = torch.rand(shape, generator=g) < 0.4
        out.append(base + _randn(seed, shape, 0.3) * mask)
    return out


def merge(name, tensors, base_index=0, params=None):
    return METHODS[name].merge(MergeInputs(list(tensors), base_index, [], params or {}, "t"))


def mergekit(name, tensors, base_index=0, params=None):
    group = TensorGroup.from_tensors(tensors, base_index=base_index)
    return mergekit_registry.get(name)((group,), parameters=dict(params or {}))[0]


# ---------------------------------------------------------------- float64 references


def ref_fusion(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    b, m = base.double(), model.double()
    rows_b = b.reshape(-1, b.shape[-1])
    rows_m = m.reshape(-1, m.shape[-1])
    importance = torch.empty_like(rows_m)
    for r in range(rows_m.shape[0]):
        p = [math.exp(v) for v in rows_m[r].tolist()]
        q = [math.exp(v) for v in rows_b[r].tolist()]
        sp, sq = sum(p), sum(q)
        p = [v / sp + 1e-8 for v in p]
        q = [v / sq + 1e-8 for v in q]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        for c in range(rows_m.shape[1]):
            importance[r, c] = abs(float(rows_m[r, c] - rows_b[r, c])) * kl
    values = sorted(importance.flatten().tolist())
    n = len(values)
    q1, med, q3 = (values[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    threshold = med + 1.5 * (q3 - q1)
    keep = (importance >= threshold).reshape(m.shape)
    return torch.where(keep, m, b)


def ref_ram(tensors, eps: float, plus: bool = False, r: float = 0.1, alpha: float = 0.2) -> torch.Tensor:
    base = tensors[0].double().flatten().tolist()
    deltas = [[x - y for x, y in zip(t.double().flatten().tolist(), base)] for t in tensors[1:]]
    counts = [sum(abs(d[j]) > eps for d in deltas) for j in range(len(base))]
    scales = []
    for d in deltas:
        shared = sum(1 for j, v in enumerate(d) if abs(v) > eps and counts[j] > 1)
        unique = sum(1 for j, v in enumerate(d) if abs(v) > eps and counts[j] == 1)
        rho = shared / max(unique, eps)
        scales.append(1 + r * min(max(rho, 0), alpha) if plus else 1.0)
    out = []
    for j, b in enumerate(base):
        total = 0.0
        for d, s in zip(deltas, scales):
            if abs(d[j]) > eps:
                total += d[j] * s if counts[j] == 1 else d[j] / counts[j]
        out.append(b + total)
    return torch.tensor(out, dtype=torch.float64).reshape(tensors[0].shape)


# ---------------------------------------------------------------- goldens


@pytest.mark.parametrize("shape", [(12, 20), (64,), (3, 4, 5)])
def test_arcee_fusion_golden(shape):
    base = _randn(0, shape)
    model = base + _randn(1, shape, 0.3)
    ours = merge("arcee_fusion", [base, model])
    expected = ref_fusion(base, model)
    torch.testing.assert_close(ours.double(), expected, **GOLDEN)
    taken = (ours != base).float().mean().item()
    assert 0 < taken < 0.5, taken  # an outlier rule: a minority of entries move to the fine-tune


def test_arcee_fusion_base_may_come_second():
    base, model = _randn(0), _randn(0) + _randn(1, scale=0.3)
    torch.testing.assert_close(merge("arcee_fusion", [model, base], base_index=1),
                               merge("arcee_fusion", [base, model], base_index=0), rtol=0, atol=0)


@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_ram_golden(eps):
    tensors = sparse_finetunes()
    torch.testing.assert_close(merge("ram", tensors, params={"epsilon": eps}).double(),
                               ref_ram(tensors, eps), **GOLDEN)


@pytest.mark.parametrize("params", [{}, {"r": 0.5, "alpha": 1.0}, {"r": 2.0, "alpha": 0.05, "epsilon": 0.05}])
def test_ramplus_tl_golden(params):
    tensors = sparse_finetunes()
    full = {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5, **params}
    expected = ref_ram(tensors, full["epsilon"], plus=True, r=full["r"], alpha=full["alpha"])
    torch.testing.assert_close(merge("ramplus_tl", tensors, params=params).double(), expected, **GOLDEN)
    # the boost only touches entries one model changed: where several did, RAM and RAM+ agree
    ram = merge("ram", tensors, params={"epsilon": full["epsilon"]})
    counts = sum(((t - tensors[0]).abs() > full["epsilon"]).int() for t in tensors[1:])
    assert torch.equal(merge("ramplus_tl", tensors, params=params)[counts != 1], ram[counts != 1])


def test_ram_with_the_base_alone_is_the_base():
    base = _randn(0)
    assert torch.equal(merge("ram", [base]), base)
    assert torch.equal(merge("ramplus_tl", [base]), base)


def test_ram_of_one_model_is_that_model_where_it_moved():
    base, model = sparse_finetunes(n=1)
    out = merge("ram", [base, model])
    moved = (model - base).abs() > 1e-5
    torch.testing.assert_close(out[moved], model[moved], rtol=0, atol=1e-6)
    assert torch.equal(out[~moved], base[~moved])


# ---------------------------------------------------------------- parity with mergekit 0.1.5


@pytest.mark.parametrize("shape", [(12, 20), (64,), (3, 4, 5)])
def test_arcee_fusion_parity(shape):
    base = _randn(0, shape)
    model = base + _randn(1, shape, 0.3)
    torch.testing.assert_close(merge("arcee_fusion", [base, model]), mergekit("arcee_fusion", [base, model]),
                               **PARITY)


@pytest.mark.parametrize("name,params", [
    ("ram", {}), ("ram", {"epsilon": 0.1}),
    ("ramplus_tl", {}), ("ramplus_tl", {"r": 0.5, "alpha": 1.0}), ("ramplus_tl", {"epsilon": 0.05, "r": 2.0}),
])
@pytest.mark.parametrize("base_index", [0, 2])
def test_ram_parity(name, params, base_index):
    tensors = sparse_finetunes()
    tensors[0], tensors[base_index] = tensors[base_index], tensors[0]
    torch.testing.assert_close(merge(name, tensors, base_index, params), mergekit(name, tensors, base_index, params),
                               **PARITY)


def test_ramplus_tl_when_a_model_has_no_unique_entries():
    """Every change of model 1 is shared with model 2: unique count 0, rho = shared / epsilon, capped."""
    base = _randn(0)
    shared = _randn(1, scale=0.3)
    tensors = [base, base + shared, base + shared * 0.5 + _randn(2, scale=0.3) * (torch.rand(12, 20) < 0.3)]
    torch.testing.assert_close(merge("ramplus_tl", tensors), mergekit("ramplus_tl", tensors), **PARITY)
