"""Recipe parsing: mergekit's schema, strict one-line errors, safe YAML, parameter resolution."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from merger.errors import RecipeError
from merger.methods import get_method
from merger.recipe import ModelRef, evaluate_setting, load_recipe, parse_recipe, resolve_parameter
from tests.conftest import EXAMPLE_RECIPES


@pytest.mark.parametrize("path", EXAMPLE_RECIPES, ids=lambda p: p.name)
def test_every_example_recipe_parses(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.text == path.read_text()
    first = recipe.models[0].model if recipe.models else recipe.slices[0].sources[0].model
    assert recipe.referenced_models()[0] == (recipe.base_model or first)
    assert all(not ref.local for ref in recipe.referenced_models())


def test_model_references() -> None:
    recipe = parse_recipe("""
models:
  - model: org/a@v1.0
  - model: org/b
    parameters: {weight: 1}
  - model: gpt2
    parameters: {weight: 1}
merge_method: linear
parameters: {weight: 0.5}
""")
    refs = recipe.referenced_models()
    assert refs == [ModelRef("org/a", "v1.0"), ModelRef("org/b"), ModelRef("gpt2")]
    assert str(refs[0]) == "org/a@v1.0"


def test_local_folders_resolve_relative_to_the_recipe(tmp_path: Path, llama_family) -> None:
    (tmp_path / "sub").mkdir()
    recipe_path = tmp_path / "sub" / "r.yml"
    base = os.path.relpath(llama_family["base"], recipe_path.parent)
    chat = os.path.relpath(llama_family["chat"], recipe_path.parent)
    assert base.startswith("..")
    recipe_path.write_text(f"models:\n  - model: {base}\n  - model: {chat}\n"
                           f"merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.5}}\n")
    recipe = load_recipe(recipe_path)
    assert recipe.base_model.local and Path(recipe.base_model.repo) == llama_family["base"].resolve()
    assert recipe.referenced_models() == [recipe.base_model, recipe.models[1].model]


@pytest.mark.parametrize("text, message", [
    ("merge_method: dare-ties\nmodels: [{model: a/b}]\nbase_model: a/b", "did you mean 'dare_ties'"),
    ("merge_method: tie\nmodels: [{model: a/b}]", "did you mean 'ties'"),
    ("merge_method: linear\nmodels: [{model: a/b, paramters: {weight: 1}}]",
     "has no 'weight'.*'paramters' is ignored; did you mean 'parameters'"),
    ("merge_method: linear\nmodel: [{model: a/b}]", "exactly one of.*'model' is ignored; did you mean 'models'"),
    ("merge_method: ties\nbase_model: a/b\nmodels: [{model: a/b}, {model: c/d, parameters: {density: 1.5, weight: 1}}]",
     r"density must be in \(0, 1\]"),
    ("merge_method: ties\nbase_model: a/b\nmodels: [{model: a/b}, {model: c/d, parameters: {density: 0, weight: 1}}]",
     r"density must be in \(0, 1\]"),
    ("merge_method: slerp\nbase_model: a/b\nmodels: [{model: a/b}, {model: c/d}]\nparameters: {t: 1.2}", r"t must be in \[0, 1\]"),
    ("merge_method: slerp\nbase_model: a/b\nmodels: [{model: a/b}, {model: c/d}]\nparameters: {t: [0, 2]}", r"t must be in \[0, 1\]"),
    ("merge_method: linear\nmodels: [{model: a/b, parameters: {weight: lots}}]", "weight must be a number"),
    ("merge_method: linear\nmodels: [{model: a/b, parameters: {weight: .nan}}]", "weight must be a"),
    ("merge_method: linear\nmodels: [{model: a/b, parameters: {weight: 1}}, {model: c/d, parameters: {weight: -1}}]",
     "weights sum to zero"),
    ("merge_method: ties\nmodels: [{model: a/b}, {model: c/d, parameters: {weight: 1}}]", "needs a base_model"),
    ("merge_method: task_arithmetic\nbase_model: x/y\nmodels: [{model: a/b, parameters: {weight: 1}}]", None),
    ("merge_method: linear\nmodels: [{model: a/b}]\nslices: []", "exactly one of 'models:'"),
    ("merge_method: linear\ndtype: float8\nmodels: [{model: a/b, parameters: {weight: 1}}]", "dtype 'float8' is not supported"),
    ("merge_method: passthrough\nslices: [{sources: [{model: a/b, layer_range: [4, 2]}]}]", "empty or negative"),
    ("merge_method: passthrough\nslices: [{sources: [{model: a/b, layer_range: [0, 2]}, {model: c/d, layer_range: [0, 3]}]}]",
     "same number of layers"),
    ("merge_method: linear\nmodels: [{model: 'not a repo!'}]", "is not a Hub repo ID"),
    ("merge_method: linear\nmodels: [{model: a/b+lora/x+lora/y}]", "one .\\+. between the two"),
    ("merge_method: linear\nparameters: {weight: 1}\nmodels: [a/b]\nchat_template: chatlm", "did you mean 'chatml'"),
    ("merge_method: linear\nparameters: {weight: 1}\nmodels: [a/b]\nchat_template: chatml", None),
    ("merge_method: linear\nparameters: {weight: 1}\nmodels: [a/b]\nchat_template: '{{ messages }}'", None),
    ("merge_method: linear\nmodels: [{model: a/b, parameters: {weight: 1}}, {model: c/d}]", "c/d has no 'weight'"),
    ("merge_method: ties\nbase_model: a/b\nmodels: [{model: a/b}, {model: c/d}]", "c/d has no 'weight'"),
    ("merge_method: slerp\nbase_model: a/b\nmodels: [{model: a/b}, {model: c/d}]", "slerp needs 't'"),
    ("merge_method: linear\nparameters: {weight: 1}\nmodels: [" + ", ".join(f"m/x{i}" for i in range(65)) + "]",
     "names 65 different models; at most 64"),
    ("merge_method: linear\nmodels: [{model: a/b}]\nmodels: [{model: c/d}]", "key 'models' appears twice"),
    ("", "the recipe is empty"),
    ("- just\n- a list", "the recipe must be a mapping"),
    ("merge_method: [linear]\nmodels: [{model: a/b}]", "merge_method must be a method name"),
    ("merge_method: linear\nmodels: [{model: a/b\n", "not valid YAML: line"),
    ("!!python/object/apply:os.system ['echo hi']", "unsupported YAML tag"),
    ("merge_method: !!python/name:os.system linear", "unsupported YAML tag"),
])
def test_bad_recipes_get_one_clear_line(text: str, message: str | None) -> None:
    if message is None:
        parse_recipe(text)
        return
    with pytest.raises(RecipeError, match=message) as e:
        parse_recipe(text)
    assert "\n" not in str(e.value)


def test_alias_bomb_is_refused_quickly() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 10):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        bomb += f"{cur}: &{cur} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
    with pytest.raises(RecipeError, match="alias bomb"):
        parse_recipe(bomb)


def test_deep_nesting_and_huge_documents_are_refused() -> None:
    with pytest.raises(RecipeError, match="nested"):
        parse_recipe("a: " + "[" * 500 + "]" * 500)
    with pytest.raises(RecipeError, match="larger than"):
        parse_recipe("merge_method: linear\n# " + "x" * (1 << 20))


def test_local_paths_refused_in_space_mode(tmp_path: Path) -> None:
    for ref in ("/etc", "../x", "~/models", "file:///etc/passwd", "./model"):
        with pytest.raises(RecipeError, match="local paths are not allowed|not a Hub repo"):
            parse_recipe(f"merge_method: linear\nmodels: [{{model: '{ref}', parameters: {{weight: 1}}}}]",
                         allow_local=False)


def test_gradient_interpolation_matches_mergekit_formula() -> None:
    values = [0, 0.5, 0.3, 0.7, 1]
    for t in (0.0, 0.1, 0.25, 0.3, 0.5, 0.9, 1.0):
        scaled = t * 4
        i0 = int(scaled)
        i1 = min(4, i0 + 1)
        expected = (1 - (scaled - i0)) * values[i0] + (scaled - i0) * values[i1]
        assert evaluate_setting(values, "model.layers.0.x", t, float) == pytest.approx(expected, abs=1e-12)


def test_conditional_first_match_wins_and_falls_through() -> None:
    setting = [{"filter": "q_proj", "value": 0.5}, {"filter": "proj", "value": 0.2}, {"value": 0}]
    assert evaluate_setting(setting, "model.layers.1.self_attn.q_proj.weight", 0.3, float) == 0.5
    assert evaluate_setting(setting, "model.layers.1.self_attn.k_proj.weight", 0.3, float) == 0.2
    assert evaluate_setting(setting, "model.norm.weight", 0.3, float) == 0
    assert evaluate_setting([{"filter": "mlp", "value": [0, 1]}], "model.layers.0.mlp.up.weight", 0.25, float) == 0.25
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "model.norm.weight", 0, float) is None


def test_precedence_model_over_slice_over_top_over_default() -> None:
    weight = next(p for p in get_method("ties").params if p.name == "weight")
    density = next(p for p in get_method("ties").params if p.name == "density")
    model, slice_, top = {"weight": 0.9}, {"weight": 0.5, "density": 0.4}, {"weight": 0.1, "density": 0.2}
    assert resolve_parameter(weight, (model, slice_, top), "x", 0) == 0.9
    assert resolve_parameter(density, (model, slice_, top), "x", 0) == 0.4
    assert resolve_parameter(density, (model, None, top), "x", 0) == 0.2
    assert resolve_parameter(density, (None, None, None), "x", 0) == density.default
    # a conditional that matches nothing falls through to the next scope
    assert resolve_parameter(weight, ({"weight": [{"filter": "mlp", "value": 2}]}, None, top), "attn", 0) == 0.1
    with pytest.raises(RecipeError, match="'weight' has no value"):
        resolve_parameter(weight, (None,), "x", 0)


def test_scientific_notation_strings_are_numbers() -> None:
    recipe = parse_recipe("merge_method: della\nbase_model: a/b\nmodels: [{model: a/b}, "
                          "{model: c/d, parameters: {weight: 1, density: 0.5, epsilon: 1e-2}}]")
    assert recipe.models[1].params["epsilon"] == "1e-2"  # YAML 1.1 reads it as a string, like mergekit
    epsilon = next(p for p in get_method("della").params if p.name == "epsilon")
    assert resolve_parameter(epsilon, (recipe.models[1].params,), "x", 0) == 0.01
