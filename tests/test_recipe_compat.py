"""mergekit 0.1.5's other recipe forms and its leniency: what it ignores runs as it runs, with a warning
and the likely fix (`--strict` makes them errors); `modules:`, mapping model references with a
revision; one-line refusals for files that are not merge recipes; the check resolving every parameter
of every tensor before anything is downloaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from merger.app.tiny import make_tiny_model
from merger.check import check_recipe
from merger.errors import RecipeError
from merger.methods import get_method
from merger.recipe import ModelRef, parse_recipe, resolve_parameter
from mergekit.config import ConfigReader, MergeConfiguration
from mergekit.merge_methods import registry as mergekit_registry
from mergekit.parameter_resolver import resolve_parameter as mergekit_resolve

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compat")
    base = make_tiny_model(root / "base", "llama", num_layers=2, header_only=True)
    return base, make_tiny_model(root / "chat", "llama", num_layers=2, seed=1, header_only=True)


def ties(pair, extra: str = "", model_params: str = "{weight: 0.5, density: 0.5}") -> str:
    base, chat = pair
    return (f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {base}\n"
            f"  - model: {chat}\n    parameters: {model_params}\n{extra}")


# ---------------------------------------------------------------- keys mergekit ignores


def test_misspelt_parameter_runs_without_it_and_warns_with_the_fix(pair) -> None:
    recipe = parse_recipe(ties(pair, "parameters:\n  nomalize: false\n"))
    assert "nomalize" not in recipe.params
    (warning,) = recipe.warnings
    assert "'nomalize' is not a parameter of ties and is ignored; did you mean 'normalize'?" in warning
    assert "a model published from this recipe was made without it" in warning


def test_weight_given_to_a_method_that_takes_none(pair) -> None:
    base, chat = pair
    text = f"merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {base}\n" \
           f"  - model: {chat}\n    parameters:\n      weight: [1, 0.5]\n"
    recipe = parse_recipe(text)
    assert recipe.models[1].params == {}
    assert "'weight' is not a parameter of arcee_fusion and is ignored" in recipe.warnings[0]
    assert "arcee_fusion's parameters: none" in recipe.warnings[0]


def test_unused_top_level_key_and_shared_value_under_a_model(pair) -> None:
    recipe = parse_recipe(ties(pair, "int8_mask: true\n", "{weight: 0.5, density: 0.5, normalize: false}"))
    top, under_model = recipe.warnings
    assert "the recipe: 'int8_mask' is ignored" in top and "keys read here: models, slices" in top
    assert "'normalize' applies to the whole merge and is ignored under one model" in under_model
    assert recipe.models[1].params == {"weight": 0.5, "density": 0.5}


def test_duplicate_keys_keep_the_last_value_like_yaml_safe_load(pair) -> None:
    text = ties(pair, "dtype: float32\ndtype: bfloat16\n")
    recipe = parse_recipe(text)
    assert recipe.dtype == "bfloat16" == yaml.safe_load(text)["dtype"]
    assert "key 'dtype' appears twice" in recipe.warnings[0] and "is ignored" in recipe.warnings[0]


def test_an_ignored_key_is_named_when_it_causes_a_refusal(pair) -> None:
    with pytest.raises(RecipeError, match=r"has no 'weight'.*note: .*'paramters' is ignored; did you mean 'parameters'"):
        parse_recipe(ties(pair).replace("    parameters:", "    paramters:"))


def test_sibling_revision_key_is_ignored_with_the_way_to_pin_it(pair) -> None:
    recipe = parse_recipe("merge_method: linear\nmodels:\n  - model: org/a\n    revision: v2\n"
                          "    parameters: {weight: 1}\n")
    assert recipe.models[0].model == ModelRef("org/a")
    assert "write it after the name: 'model: org/name@revision'" in recipe.warnings[0]


def test_values_out_of_range_and_wrong_types_stay_errors(pair) -> None:
    with pytest.raises(RecipeError, match="density must be in"):
        parse_recipe(ties(pair, model_params="{weight: 0.5, density: 1.5}"))
    with pytest.raises(RecipeError, match="must be a number"):
        parse_recipe(ties(pair, model_params="{weight: heavy}"))


def test_strict_check_turns_the_warnings_into_errors(pair) -> None:
    recipe = parse_recipe(ties(pair, "parameters:\n  nomalize: false\n"))
    relaxed = check_recipe(recipe)
    assert relaxed.ok and [p.severity for p in relaxed.problems if "nomalize" in p.message] == ["warning"]
    strict = check_recipe(recipe, strict=True)
    assert not strict.ok and [p.severity for p in strict.problems if "nomalize" in p.message] == ["error"]
    assert "[warning] parameters: 'nomalize' is not a parameter of ties" in relaxed.to_text()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "merger", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cli_check_and_run_strict(pair, tmp_path: Path) -> None:
    path = tmp_path / "recipe.yml"
    path.write_text(ties(pair, "parameters:\n  nomalize: false\n"))
    assert _cli("check", str(path)).returncode == 0
    strict = _cli("check", str(path), "--strict")
    assert strict.returncode == 1 and "[error] parameters: 'nomalize'" in strict.stdout
    run = _cli("run", str(path), str(tmp_path / "out"), "--strict", "--device", "cpu")
    assert run.returncode == 2 and "nomalize" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()[-1:]) == 1 and not (tmp_path / "out" / "config.json").exists()
    assert "--strict" in _cli("check", "--help").stdout


# ---------------------------------------------------------------- other forms


def test_modules_form_is_the_models_form(pair) -> None:
    base, chat = pair
    flat = parse_recipe(ties(pair, "parameters: {normalize: false}\n"))
    text = (f"merge_method: ties\nbase_model: {base}\nmodules:\n  default:\n    models:\n      - model: {base}\n"
            f"      - model: {chat}\n        parameters: {{weight: 0.5, density: 0.5}}\n"
            "    parameters: {normalize: false}\n")
    module = parse_recipe(text)
    assert (module.models, module.params, module.base_model) == (flat.models, flat.params, flat.base_model)


@pytest.mark.parametrize("module_t,top_t", [
    ("[{filter: self_attn, value: 0.2}]", "0.7"),
    ("[{filter: mlp, value: [0, 1]}]", "[{filter: self_attn, value: 0.1}, {value: 0.9}]"),
    ("0.3", "[{filter: mlp, value: 0.6}]"),
])
def test_module_parameters_precede_the_top_level_as_in_mergekit(module_t: str, top_t: str) -> None:
    """mergekit reads a module's parameters, then the top level's; folded into one setting, the values
    are the ones mergekit's own resolver gives, tensor by tensor and along the layers."""
    text = ("merge_method: slerp\nbase_model: org/a\nmodules:\n  default:\n    slices:\n      - sources:\n"
            "          - {model: org/a, layer_range: [0, 4]}\n          - {model: org/b, layer_range: [0, 4]}\n"
            f"    parameters:\n      t: {module_t}\nparameters:\n  t: {top_t}\n")
    ours = parse_recipe(text)
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    reader = ConfigReader(config=config, t=0, module=config.modules["default"])
    param = get_method("slerp").param("t")
    spec = next(p for p in mergekit_registry.get("slerp").spec.parameters if p.name == "t")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight", "lm_head.weight"):
        for t in (0.0, 0.5, 1.0):
            theirs = mergekit_resolve(spec, tuple(reader.parameter_sources()), tensor_name=name, t=t)
            assert resolve_parameter(param, (ours.params,), name, t) == pytest.approx(theirs, abs=1e-12), (name, t)


def test_modules_of_multi_module_models_are_refused() -> None:
    with pytest.raises(RecipeError, match="only the single module 'default'"):
        parse_recipe("merge_method: linear\nmodules:\n  text_decoder:\n    models: [{model: a/b}]\n"
                     "  vision_tower:\n    models: [{model: a/b}]\nparameters: {weight: 1}\n")


def test_union_is_mergekits_default_tokenizer_source() -> None:
    for tail in ("tokenizer_source: union\n", "tokenizer: {source: union}\n", "tokenizer: {}\n"):
        recipe = parse_recipe("merge_method: linear\nparameters: {weight: 1}\nmodels: [a/b, c/d]\n" + tail)
        assert recipe.tokenizer_source == "union", tail


def test_mapping_model_reference_with_a_revision() -> None:
    recipe = parse_recipe("merge_method: linear\nparameters: {weight: 1}\nmodels:\n"
                          "  - model: {model: {path: org/a, revision: v1.0}}\n  - model: org/b@abc123\n")
    assert [m.model for m in recipe.models] == [ModelRef("org/a", "v1.0"), ModelRef("org/b", "abc123")]
    recipe = parse_recipe("merge_method: linear\nparameters: {weight: 1}\nmodels:\n"
                          "  - model: {model: {path: org/a, revision: v1}, lora: {path: org/adapter, revision: r2}}\n")
    assert recipe.models[0].model == ModelRef("org/a", "v1", False, ModelRef("org/adapter", "r2"))
    with pytest.raises(RecipeError, match="override_architecture is not supported"):
        parse_recipe("merge_method: linear\nparameters: {weight: 1}\nmodels:\n"
                     "  - model: {model: org/a, override_architecture: MistralForCausalLM}\n")


@pytest.mark.parametrize("text,message", [
    ("genome:\n  models: [a/b, c/d]\n  merge_method: ties\ntasks:\n  - name: arc\n", "mergekit-evolve configuration"),
    ("merge_method: linear\nmodels: [a/b]\ngate_mode: hidden\nexperts:\n  - source_model: c/d\n",
     "mixes a mergekit-moe configuration"),
    ("merge_method: linear\nmodels: [a/b]\n---\nmerge_method: slerp\n", "several YAML documents"),
    ("merge_method: frankenmoe_glue\nmodels: [a/b]\n", "mergekit 0.1.5's methods, all supported here, are: arcee_fusion"),
    ("merge_method: della_ties\nmodels: [a/b]\n", "did you mean 'dare_ties'.*methods of mergekit forks are not"),
    ("merge_method: linear\nparameters: {weight: 1}\nmodels: [a/b, c/d]\ntokenizer: {tokens: {x: {source: e/f}}}\n",
     "tokenizer.tokens\\['x'\\] takes its embedding from e/f, which is not merged here; use one of: a/b, c/d"),
    ("merge_method: linear\nparameters: {weight: 1}\nmodels: [a/b, c/d]\ntokenizer: {tokens: {x: {source: {kind: model_token, model: e/f, token: y}}}}\n",
     'takes its embedding from e/f, which is not merged'),
    ("merge_method: linear\nparameters: {weight: 1}\nmodels: [a/b, c/d]\ntokenizer: {tokens: {x: {source: {kind: mean}}}}\n",
     "tokenizer.tokens\\['x'\\].source kind 'mean' is unknown; use 'zero' or 'model_token'"),
    ("merge_method: linear\nparameters: {weight: 1}\nmodels: [a/b, c/d]\ntokenizer: {tokens: {x: {source: {kind: model_token, model: a/b}}}}\n",
     'needs exactly one of token and token_id'),
    ("merge_method: linear\nparameters: {weight: 1}\nmodels: [a/b, c/d]\ntokenizer: {tokens: {x: {source: {kind: model_token, model: a/b, token: y, token_id: 3}}}}\n",
     'needs exactly one of token and token_id'),
    ("merge_method: linear\nparameters: {weight: 1}\nmodels: [a/b, c/d]\ntokenizer: {tokens: {x: {source: {kind: model_token, model: a/b, token_id: -1}}}}\n",
     'token_id must be a row number'),
    ("merge_method: linear\nparameters: {weight: 1}\nmodels: [a/b, c/d]\ntokenizer: {tokens: {x: {source: {kind: model_token, token: y}}}}\n",
     'kind model_token needs a model'),
    ("merge_method: linear\nparameters: {weight: 1}\nmodels: [a/b, c/d]\ntokenizer: {tokens: {x: {source: a/b, force: 1}}}\n",
     'force must be true or false'),
    ("merge_method: linear\nparameters: {weight: 1}\nmodels: [a/b, c/d]\ntokenizer: {tokens: {x: {force: true}}}\n",
     'needs a source'),
    ("merge_method: linear\nparameters: {weight: 1}\nmodels: [a/b, c/d]\ntokenizer: {tokens: {x: [a/b]}}\n",
     "tokenizer.tokens\\['x'\\] must be a mapping"),
    ("merge_method: linear\nparameters: {weight: 1}\nmodels: [a/b]\ntokenizer: {pad_to_multiple_of: 0}\n",
     "pad_to_multiple_of must be a positive whole number"),
])
def test_what_is_not_a_runnable_recipe_gets_one_line(text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message) as e:
        parse_recipe(text)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- the check resolves every parameter


def test_check_refuses_a_required_value_given_only_under_a_filter(pair) -> None:
    base, chat = pair
    text = f"merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {base}}}, {{model: {chat}}}]\n" \
           "parameters:\n  t: {filter: q_proj, value: 0.5}\n"
    report = check_recipe(parse_recipe(text))
    assert not report.ok
    (error,) = [p.message for p in report.problems if p.severity == "error"]
    assert error.startswith("parameter 't' has no value for tensor model.embed_tokens.weight")
    assert "end its list with a fallback entry" in error
    fixed = text.replace("{filter: q_proj, value: 0.5}", "[{filter: q_proj, value: 0.5}, {value: 0.2}]")
    assert check_recipe(parse_recipe(fixed)).ok


def test_check_refuses_a_gradient_filter_per_model_that_misses_tensors(pair) -> None:
    report = check_recipe(parse_recipe(ties(pair, model_params="{weight: [{filter: mlp, value: [0, 1]}]}")))
    assert any("parameter 'weight' has no value for tensor model.embed_tokens.weight" in p.message
               for p in report.problems if p.severity == "error")


def test_check_refuses_values_that_clash_at_some_tensor(pair) -> None:
    """della needs density +/- epsilon inside (0, 1); a gradient can break that only in later layers."""
    base, chat = pair
    text = f"merge_method: della\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {chat}\n" \
           "    parameters: {weight: 1, density: [0.5, 0.9], epsilon: 0.15}\n"
    report = check_recipe(parse_recipe(text))
    assert any("della needs density - epsilon > 0 and density + epsilon < 1" in p.message
               for p in report.problems if p.severity == "error")


def test_check_resolves_parameters_when_vocabularies_differ(tmp_path: Path) -> None:
    base = make_tiny_model(tmp_path / "base", "llama", num_layers=2, header_only=True)
    rows = yaml.safe_load((base / "config.json").read_text())["vocab_size"]
    padded = make_tiny_model(tmp_path / "padded", "llama", num_layers=2, seed=1, vocab=rows + 8, header_only=True)
    text = f"merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {base}}}, {{model: {padded}}}]\n" \
           "tokenizer_source: base\nparameters:\n  t: {filter: mlp, value: 0.5}\n"
    report = check_recipe(parse_recipe(text))
    assert any("parameter 't' has no value for tensor model.embed_tokens.weight" in p.message
               for p in report.problems if p.severity == "error")


def test_token_settings_are_parsed_like_mergekits() -> None:
    from merger.recipe_tokens import TokenSetting

    recipe = parse_recipe("merge_method: linear\nparameters: {weight: 1}\nmodels: [a/b, c/d]\ntokenizer:\n"
                          "  tokens:\n    x: {source: {kind: zero}, force: true}\n    y: {source: c/d}\n"
                          "    '<z>': {source: {kind: model_token, model: a/b, token: w}}\n"
                          "    v: {source: {kind: model_token, model: a/b, token_id: 7}, force: false}\n")
    models = recipe.merged_models()
    assert recipe.tokenizer_source == "union"
    assert recipe.tokens == (("x", TokenSetting("zero", force=True)), ("y", TokenSetting("model", models[1])),
                             ("<z>", TokenSetting("model_token", models[0], "w")),
                             ("v", TokenSetting("model_token", models[0], token_id=7)))
    moved = recipe.with_models({models[0]: models[1]})
    assert moved.tokens[2][1].model == models[1] and moved.tokens[1][1].model == models[1]
