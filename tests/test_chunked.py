"""Merges under a memory budget: every method gives the same bits whatever the block size, from whole
tensors down to blocks smaller than one row; the engine reads, merges and writes block by block."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merger.budget import ElementCost, element_cost, memory_needed
from merger.engine import MergeRunner, plan_merge
from merger.methods import METHODS, MergeInputs
from merger.methods.blocks import GRANULE, Layout, Sums, Job, slice_span
from merger.pipeline import _union, _with_new_tokens, inspect_models, resolve_local
from merger.recipe import parse_recipe
from merger.sources import open_reader
from tests.test_tokenizer_parity import _with_tokens

# Rows wider than two granules (so a row is cut into pieces, the last one partial), a vector, and a
# tensor with more than two dimensions (cut by dim-0 rows only).
SHAPES = [(9, 2 * GRANULE + 77), (5 * GRANULE + 3,), (4, 3, 50)]

# Per method: extra shared parameter sets to run (each on top of the defaults), so that every branch
# with a whole-tensor quantity is exercised: rescale, per-row and per-column angles, top-k selection.
VARIANTS: dict[str, list[dict]] = {
    "ties": [{}, {"rescale": True}],
    "breadcrumbs": [{}, {"rescale": True}],
    "dare_linear": [{}, {"rescale": False}],
    "nuslerp": [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}],
    "model_stock": [{}, {"filter_wise": True}],
    "sce": [{}, {"select_topk": 0.4}],
    "multislerp": [{}, {"normalize_weights": False}],
}
PER_MODEL = {"weight": (0.6, 0.3, 0.8, 0.5), "density": (0.5, 0.3, 0.7, 0.6), "gamma": (0.05, 0.1, 0.02, 0.1),
             "epsilon": (0.1, 0.2, 0.05, 0.1), "scale": (0.7,)}


def _inputs(name: str, shape: tuple[int, ...], shared: dict) -> MergeInputs:
    method = METHODS[name]
    n = min(max(method.min_models, method.min_others + 1, 3), method.max_models or 4)
    base_index = 0 if method.base != "ignored" else None
    g = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=g)
    tensors = [base] + [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n - 1)]
    params = {p.name: 0.4 for p in method.params if p.required and not p.per_model}  # t
    params.update(shared)
    model_params = []
    for i in range(n):
        others = i - (1 if base_index is not None and i > base_index else 0)
        model_params.append({p.name: PER_MODEL[p.name][others] for p in method.params
                             if p.per_model and p.name in PER_MODEL and not (p.non_base and i == base_index)})
    generator = torch.Generator().manual_seed(5) if method.randomized else None
    return MergeInputs(tensors, base_index, model_params, params, "layers.0.w", generator)


def _cases():
    for name in sorted(METHODS):
        for shared in VARIANTS.get(name, [{}]):
            for shape in SHAPES:
                yield pytest.param(name, shared, shape, id=f"{name}-{shared}-{'x'.join(map(str, shape))}")


@pytest.mark.parametrize("name,shared,shape", list(_cases()))
def test_every_method_gives_the_same_bits_at_every_block_size(name: str, shared: dict, shape: tuple) -> None:
    method = METHODS[name]
    whole = method.merge(_inputs(name, shape, shared))
    layout = Layout(shape)
    row = layout.cols
    for budget in (layout.numel - 1, 2 * row + 5, row, GRANULE + 1, 1):  # the last two are under one row
        if budget >= layout.numel:
            continue
        spans = layout.spans(budget, method.whole_rows)
        assert len(spans) > 1 or (method.whole_rows and layout.rows == 1)  # DELLA ranks a vector whole
        got = method.merge(_inputs(name, shape, shared), max_elements=budget)
        assert torch.equal(got, whole), f"{name} at blocks of {budget} entries"


def test_blocks_smaller_than_a_row_are_granule_aligned_pieces_of_one_row() -> None:
    layout = Layout((3, 2 * GRANULE + 77))
    spans = layout.spans(GRANULE + 1)
    assert [(s.rows, s.cols) for s in spans[:3]] == [((0, 1), (0, GRANULE)), ((0, 1), (GRANULE, 2 * GRANULE)),
                                                     ((0, 1), (2 * GRANULE, 2 * GRANULE + 77))]
    assert len(spans) == 9 and sum(s.numel for s in spans) == layout.numel
    assert [s.shape for s in Layout((4, 3, 50)).spans(10)] == [(1, 3, 50)] * 4  # never inside a 3-D row
    assert len(Layout((5, 7)).spans(1, whole_rows=True)) == 5


def test_sums_over_blocks_equal_a_float64_sum() -> None:
    """The granule trees are exact-order float64 sums: equal to math.fsum within float64 rounding."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 3000, generator=g)
    layout = Layout(x.shape)
    for budget in (None, 3000 * 5, 1500):
        spans = layout.spans(budget)
        job = Job(x.shape, 1, spans, lambda i, final: [slice_span(x, layout, spans[i])], lambda s, v: None)
        totals, rows, columns = Sums(job, 1), Sums(job, 1, "row"), Sums(job, 1, "column")
        job.sweep(lambda b: [s.add(b, 0, b.tensors[0], b.tensors[0]) for s in (totals, rows, columns)])
        squares = x.double().square()
        assert totals.total(0) == pytest.approx(math.fsum(squares.reshape(-1).tolist()), rel=1e-14)
        torch.testing.assert_close(rows.rows(0), squares.sum(1), rtol=1e-13, atol=0)
        torch.testing.assert_close(columns.columns(0), squares.sum(0), rtol=1e-13, atol=0)


def test_random_draws_are_the_whole_tensor_stream_whatever_the_blocks() -> None:
    """DARE's draws: stream s is the s-th run of numel draws of the tensor's generator, by blocks or not."""
    shape = (6, 2 * GRANULE + 9)
    layout = Layout(shape)
    expected_gen = torch.Generator().manual_seed(9)
    expected = [torch.rand(shape, generator=expected_gen) for _ in range(3)]
    for budget in (None, 2 * shape[1], GRANULE):
        spans = layout.spans(budget)
        job = Job(shape, 1, spans, lambda i, final: [torch.empty(spans[i].shape)], lambda s, v: None,
                  generator=torch.Generator().manual_seed(9))
        got = [torch.empty(shape) for _ in range(3)]
        for _ in range(2):  # a second sweep draws the same numbers again
            job.sweep(lambda b: [slice_span(got[s], layout, b.span).copy_(b.uniform(s)) for s in (2, 0, 1)])
            assert all(torch.equal(g, e) for g, e in zip(got, expected))


# ---------------------------------------------------------------- the engine over files


RECIPES = {
    "ties": """models:
  - model: {chat}
    parameters: {{weight: 0.6, density: 0.4}}
  - model: {med}
    parameters: {{weight: 0.4, density: 0.7}}
merge_method: ties
base_model: {base}
dtype: float32
""",
    "dare_ties": """models:
  - model: {chat}
    parameters: {{weight: 0.6, density: 0.4}}
  - model: {med}
    parameters: {{weight: 0.4, density: 0.7}}
merge_method: dare_ties
base_model: {base}
""",
    "slerp": """models:
  - model: {base}
  - model: {chat}
merge_method: slerp
base_model: {base}
parameters: {{t: [0, 0.5, 1]}}
""",
    "della_vocab": """models:
  - model: {padded}
  - model: {chat}
    parameters: {{weight: 0.7, density: 0.5, epsilon: 0.1}}
merge_method: della
base_model: {padded}
tokenizer_source: base
""",
    # tokens only some models have (rows filled from the donors) and padding rows (each model's mean row)
    "ties_union_pad": """models:
  - model: {base}
  - model: {tok_a}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {tok_b}
    parameters: {{weight: 0.4, density: 0.7}}
merge_method: ties
base_model: {base}
tokenizer: {{source: union, pad_to_multiple_of: 96}}
dtype: float32
""",
    # tokenizer.tokens: rows forced to zero, to another model's row, to another token's row (by name and by id)
    "ties_union_tokens": """models:
  - model: {base}
  - model: {tok_a}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {tok_b}
    parameters: {{weight: 0.4, density: 0.7}}
merge_method: ties
base_model: {base}
tokenizer:
  source: union
  tokens:
    "</s>": {{source: {{kind: zero}}, force: true}}
    "<unk>": {{source: {tok_b}, force: true}}
    "<|b1|>": {{source: {{kind: model_token, model: {tok_a}, token_id: 5}}}}
    "<|b2|>": {{source: {{kind: model_token, model: {base}, token: "<s>"}}, force: true}}
    "<|a2|>": {{source: {tok_a}}}
    "<|a1|>": {{source: {{kind: model_token, model: {tok_a}, token: "<|a2|>"}}}}
    "<|new|>": {{source: {{kind: model_token, model: {tok_b}, token: "<|b1|>"}}}}
dtype: float32
""",
}


def _run(recipe_text: str, budget: int | None) -> tuple[dict[str, torch.Tensor], MergeRunner]:
    recipe = parse_recipe(recipe_text)
    folders = resolve_local(recipe)
    infos = inspect_models(recipe, folders, allow_bin=False)
    vocabs = None
    if recipe.tokenizer_source is not None:
        from merger.pipeline import load_vocab
        vocabs = {ref: v for ref in infos if (v := load_vocab(folders[ref])) is not None}
    union = _union(recipe, infos, folders) if recipe.tokenizer_source == "union" else None
    union = _with_new_tokens(recipe, union, vocabs, infos) if recipe.tokens else union
    plan = plan_merge(recipe, infos, vocabs=vocabs, union_vocab=union.vocab if union else None)
    readers = {ref: open_reader(folders[ref]) for ref in infos}
    parts: dict[str, list[torch.Tensor]] = {}
    wholes: dict[str, torch.Tensor] = {}
    runner = MergeRunner(plan, readers, device="cpu", seed=3, max_memory=budget)
    runner.run([lambda name, t: wholes.__setitem__(name, t.clone())],
               part_sinks=[lambda name, t: parts.setdefault(name, []).append(t.clone())])
    for r in readers.values():
        r.close()
    merged = {}
    for o in plan.outputs:
        merged[o.name] = torch.cat([p.reshape(-1) for p in parts[o.name]]).reshape(o.shape)
        assert torch.equal(merged[o.name], wholes[o.name])  # the assembled copy for whole-tensor sinks agrees
    return merged, runner


@pytest.fixture(scope="module")
def family(models_dir: Path, llama_family) -> dict[str, Path]:
    from merger.app.tiny import make_tiny_model
    import json

    rows = json.loads((llama_family["base"] / "config.json").read_text())["vocab_size"]
    padded = make_tiny_model(models_dir / "llama-padded-chunked", "llama", seed=3, vocab=rows + 8)
    tok_a = _with_tokens(make_tiny_model(models_dir / "llama-tokens-a", "llama",
                                         seed=6, vocab=rows + 2), ["<|a1|>", "<|a2|>"])
    tok_b = _with_tokens(make_tiny_model(models_dir / "llama-tokens-b", "llama",
                                         seed=7, vocab=rows + 3), ["<|a1|>", "<|b1|>", "<|b2|>"])
    return {**llama_family, "padded": padded, "tok_a": tok_a, "tok_b": tok_b}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_engine_output_is_identical_under_any_budget(name: str, family) -> None:
    text = RECIPES[name].format(**{k: str(v) for k, v in family.items()})
    whole, runner = _run(text, None)
    assert runner.blocks == len(runner.plan.outputs)  # the default budget holds every tiny tensor
    if name in ("della_vocab", "ties_union_pad"):
        assert runner.plan.outputs[0].vocab is not None  # the embedding's rows are gathered by token
    if name == "ties_union_pad":
        vocab = runner.plan.outputs[0].vocab
        assert vocab.pad > 0 and bool((torch.stack(vocab.index) < 0).any())  # padding and missing rows exist
    if name == "ties_union_tokens":
        fill = runner.plan.outputs[0].vocab.fill
        assert bool(fill[:, 2].all()) and bool(fill[:, 0].all())  # forced rows of tokens every model has
        assert runner.plan.outputs[0].vocab.lent  # the base carries tok_a's <|a2|> row for <|a1|>
    for budget in (200_000, 20_000, 2_000):  # the last one is below a row of the widest tensors
        got, chunked = _run(text, budget)
        assert chunked.blocks > len(runner.plan.outputs)  # some tensors were cut (all at the smallest)
        for key, tensor in whole.items():
            assert torch.equal(got[key], tensor), f"{key} differs at a budget of {budget} bytes"


def test_working_buffers_stay_within_the_budget(family) -> None:
    """What the runner keeps between blocks (reads, staged inputs, kernel buffers, outputs) fits the budget."""
    text = RECIPES["ties"].format(**{k: str(v) for k, v in family.items()})
    budget = 60_000
    _, runner = _run(text, budget)
    kept = sum(t.numel() * t.element_size() for t in [*runner._raw, *runner._staged[0], *runner._outputs,
                                                      *runner._kernel_buffers.values()])
    assert 0 < kept <= budget


def test_cli_max_memory_gives_the_same_files(tmp_path: Path, family) -> None:
    from merger.__main__ import main

    recipe = tmp_path / "r.yml"
    recipe.write_text(RECIPES["ties"].format(**{k: str(v) for k, v in family.items()}))
    assert main(["run", str(recipe), str(tmp_path / "a"), "--device", "cpu", "--no-check"]) == 0
    assert main(["run", str(recipe), str(tmp_path / "b"), "--device", "cpu", "--no-check", "--max-memory", "30kB"]) == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_cli_refuses_a_bad_budget_in_one_line(tmp_path: Path, capsys, family) -> None:
    from merger.__main__ import main

    recipe = tmp_path / "r.yml"
    recipe.write_text(RECIPES["ties"].format(**{k: str(v) for k, v in family.items()}))
    assert main(["run", str(recipe), str(tmp_path / "a"), "--max-memory", "lots"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --max-memory 'lots' is not a size; write it like 5GB, 500MB or 2GiB"


def test_memory_needed_is_bounded_by_the_budget_not_the_tensor() -> None:
    ties = METHODS["ties"]
    small = memory_needed(ties, 3, 128256 * 4096, budget=1 << 30)
    huge = memory_needed(ties, 3, 10 * 128256 * 4096, budget=1 << 30)
    assert small == huge and small.ram_bytes < (1 << 30) + 1024**3 and small.vram_bytes == 0
    unbounded = memory_needed(ties, 3, 128256 * 4096, budget=None)
    assert unbounded.ram_bytes > 10 * 1024**3  # the whole embedding at once, as before budgets
    gpu = memory_needed(ties, 3, 128256 * 4096, budget=1 << 30, cuda=True)
    assert gpu.vram_bytes < (1 << 30) + 1024**3 and gpu.ram_bytes < small.ram_bytes
    cost = element_cost(ties, [2, 2, 2], 2, cuda=False)
    assert isinstance(cost, ElementCost) and cost.block_elements(1 << 30, False) * (cost.host + cost.device) <= 1 << 30


def test_engine_cuts_inside_rows_of_a_wide_model(models_dir: Path) -> None:
    """Rows wider than two granules (hidden 1032, MLP rows 2064): blocks under one row read one row
    and take granule-aligned pieces of it; the output is the same bits as whole tensors."""
    from merger.app.tiny import make_tiny_model

    base = make_tiny_model(models_dir / "wide-base", "llama", seed=5, num_layers=1, hidden=1032)
    chat = make_tiny_model(models_dir / "wide-chat", perturb_from=base, seed=6, perturb_scale=0.05)
    text = f"""models:
  - model: {chat}
    parameters: {{weight: 0.7, density: 0.4}}
merge_method: dare_ties
base_model: {base}
"""
    whole, _ = _run(text, None)
    got, runner = _run(text, 60_000)
    down = next(i for i, o in enumerate(runner.plan.outputs) if o.name.endswith("down_proj.weight"))
    assert runner.plan.outputs[down].shape[1] == 2064 and len(runner.spans(down)) > 1032
    assert all(torch.equal(got[k], v) for k, v in whole.items())
