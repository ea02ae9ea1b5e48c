"""DARE and DELLA draw their random masks from a generator seeded per tensor (run seed + tensor name), so a
merge gives the same tensors whatever order the tensors are merged in, and whatever the global RNG did.

Device independence (a CPU generator even when merging on a GPU) is by construction in MergeRunner._merge;
it is not tested here: these machines have no GPU.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from merger.engine import MergeRunner, plan_merge
from merger.pipeline import inspect_models, resolve_local
from merger.recipe import parse_recipe
from merger.sources import open_reader

RANDOM_METHODS = {
    "dare_ties": "density: 0.5",
    "dare_linear": "density: 0.5",
    "della": "density: 0.5, epsilon: 0.2",
    "della_linear": "density: 0.5, epsilon: 0.2",
}


def _plan(llama_family: dict[str, Path], method: str):
    params = RANDOM_METHODS[method]
    recipe = parse_recipe(f"""models:
  - model: {llama_family['base']}
  - model: {llama_family['chat']}
    parameters: {{weight: 0.6, {params}}}
  - model: {llama_family['med']}
    parameters: {{weight: 0.4, {params}}}
merge_method: {method}
base_model: {llama_family['base']}
dtype: float32
""")
    folders = resolve_local(recipe)
    return plan_merge(recipe, inspect_models(recipe, folders, allow_bin=False)), folders


def _merge(plan, folders, outputs, seed: int = 5) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    readers = {ref: open_reader(folder) for ref, folder in folders.items()}
    try:
        MergeRunner(dataclasses.replace(plan, outputs=list(outputs)), readers, device="cpu", seed=seed).run(
            [lambda name, tensor: got.__setitem__(name, tensor.clone())])  # the runner reuses its buffers
    finally:
        for reader in readers.values():
            reader.close()
    return got


@pytest.mark.parametrize("method", list(RANDOM_METHODS))
def test_random_methods_do_not_depend_on_tensor_order(llama_family: dict[str, Path], method: str) -> None:
    plan, folders = _plan(llama_family, method)
    forward = _merge(plan, folders, plan.outputs)
    torch.manual_seed(1234)  # the global RNG plays no part
    torch.rand(1000)
    shuffled = list(plan.outputs)
    random.Random(7).shuffle(shuffled)
    assert shuffled != plan.outputs
    for order in (shuffled, plan.outputs[::-1]):
        other = _merge(plan, folders, order)
        assert other.keys() == forward.keys()
        assert all(torch.equal(other[n], forward[n]) for n in forward), method
    for out in plan.outputs[::5]:  # a tensor merged on its own, with no draws before it
        alone = _merge(plan, folders, [out])
        assert torch.equal(alone[out.name], forward[out.name]), out.name
    name = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(_merge(plan, folders, [o for o in plan.outputs if o.name == name], seed=6)[name],
                           forward[name])  # the draws are real: another seed, another mask
