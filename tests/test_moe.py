"""mergekit-moe configs: recognised among recipes, validated in one line (beside mergekit 0.1.5's own
validation), checked from headers only, assembled by the CLI and the app, and carded."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from merger.__main__ import main as merger_main
from merger.app import demo
from merger.app.gallery import load_gallery
from merger.app.runs import DONE, RunQueue
from merger.app.tiny import make_tiny_model
from merger.errors import RecipeError
from merger.moe import MoERecipe, is_moe
from merger.moe.check import check_moe
from merger.recipe import parse_recipe

A, B, C = "org/code-7b", "org/story-7b", "org/math-7b"
BASE = "org/base-7b"


def config(**overrides: object) -> str:
    data: dict[str, object] = {"base_model": BASE, "gate_mode": "hidden", "experts": [
        {"source_model": A, "positive_prompts": ["def f():"]},
        {"source_model": B, "positive_prompts": ["Once upon a time"], "negative_prompts": ["import os"]}]}
    data.update(overrides)
    return yaml.safe_dump({k: v for k, v in data.items() if v is not None}, sort_keys=False)


def test_moe_config_is_recognised_with_mergekit_defaults() -> None:
    recipe = parse_recipe(config(gate_mode=None))
    assert is_moe(recipe) and isinstance(recipe, MoERecipe)
    assert (recipe.gate_mode, recipe.experts_per_token, recipe.dtype, recipe.shared_experts) == ("hidden", 2, None, ())
    assert [str(r) for r in recipe.referenced_models()] == [BASE, A, B]
    assert recipe.experts[1].negative_prompts == ("import os",)
    assert not is_moe(parse_recipe("merge_method: linear\nmodels:\n  - model: a/b\n    parameters: {weight: 1}\n"))


@pytest.mark.parametrize("overrides, message", [
    ({"gate_mode": "hiden"}, "gate_mode 'hiden' is not one of .*did you mean 'hidden'"),
    ({"experts": []}, "lists no experts"),
    ({"experts_per_token": 3}, "experts_per_token is 3 but only 2 expert"),
    ({"experts_per_token": 0}, "experts_per_token must be at least 1"),
    ({"experts_per_token": "two"}, "experts_per_token must be a whole number"),
    ({"experts": [{"source_model": A, "positive_prompts": ["x"]}, {"source_model": B}]},
     r"experts\[1\] has no positive_prompts; gate_mode hidden"),
    ({"gate_mode": "cheap_embed", "experts": [{"source_model": A}, {"source_model": B}]},
     r"experts\[0\] has no positive_prompts; gate_mode cheap_embed"),
    ({"experts": [{"source_model": A, "positive_prompts": ["x"]}, {"source_model": B, "positive_prompts": ["x"]}]},
     "every expert has the same prompts"),
    ({"experts": [{"source_model": A, "positive_prompts": ["x"]}], "experts_per_token": 1},
     "a single expert cannot be routed"),
    ({"experts": [{"source_model": A, "positive_prompts": ["x"]}, {"source_model": A, "positive_prompts": ["y"]}]},
     "every expert is the same model"),
    ({"experts": [{"source_model": A, "positive_prompts": "code"}, {"source_model": B}]},
     r"positive_prompts must be a list of prompts"),
    ({"experts": [{"positive_prompts": ["x"]}, {"source_model": B}]}, r"experts\[0\] has no 'source_model'"),
    ({"base_model": None}, "has no 'base_model'"),
    ({"dtype": "fp8"}, "dtype 'fp8' is not supported by mergekit-moe"),
    ({"architecture": "deepseek"}, "Deepseek MoE.* is not supported here yet"),
    ({"architecture": "gpt"}, "not one of mergekit-moe's output architectures"),
    ({"shared_experts": [{"source_model": A, "positive_prompts": ["x"]}, {"source_model": B}]},
     "every shared expert or to none"),
    ({"experts": [{"source_model": A, "positive_prompts": ["x"], "residual_scale": "half"},
                  {"source_model": B, "positive_prompts": ["y"]}]}, r"residual_scale must be a number"),
])
def test_bad_moe_configs_are_refused_in_one_line(overrides: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message) as info:
        parse_recipe(config(**overrides))
    assert "\n" not in str(info.value)


def test_random_gates_need_no_prompts_and_may_repeat_a_model() -> None:
    """mergekit's is_bad_config returns early for gate_mode random, before the prompt and same-model tests."""
    recipe = parse_recipe(config(gate_mode="random", experts=[{"source_model": A}, {"source_model": A}]))
    assert [e.positive_prompts for e in recipe.experts] == [(), ()]


def test_keys_mergekit_ignores_are_warned_not_refused() -> None:
    recipe = parse_recipe(config(tokenizer_source="base", experts_per_tokn=2))
    assert len(recipe.warnings) == 2
    assert "'tokenizer_source' is ignored by mergekit-moe (mergekit-moe always uses the base" in recipe.warnings[0]
    assert "did you mean 'experts_per_token'?" in recipe.warnings[1]


def _mergekit_accepts(text: str) -> bool:
    """mergekit 0.1.5's own validation: the pydantic schema, then is_bad_config (what mergekit-moe runs first)."""
    import pydantic
    from mergekit.moe.config import MoEMergeConfig, is_bad_config

    try:
        parsed = MoEMergeConfig.model_validate(yaml.safe_load(text))
    except pydantic.ValidationError:
        return False
    logging.disable(logging.ERROR)
    try:
        return not is_bad_config(parsed)
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize("overrides", [
    {}, {"gate_mode": "cheap_embed"}, {"gate_mode": "random", "experts": [{"source_model": A}, {"source_model": A}]},
    {"experts_per_token": 1}, {"experts_per_token": 3}, {"experts_per_token": 0}, {"experts": []},
    {"experts": [{"source_model": A, "positive_prompts": ["x"]}, {"source_model": B}]},
    {"experts": [{"source_model": A, "positive_prompts": ["x"]}, {"source_model": B, "positive_prompts": ["x"]}]},
    {"experts": [{"source_model": A, "positive_prompts": ["x"]}, {"source_model": A, "positive_prompts": ["y"]}]},
    {"experts": [{"source_model": A, "positive_prompts": ["x"]}], "experts_per_token": 1},
    {"gate_mode": "uniform_random", "experts": [{"source_model": A}, {"source_model": B}]},
    {"shared_experts": [{"source_model": BASE, "positive_prompts": ["hi"]}]},
    {"experts_per_token": "two"}, {"nonsense_key": 1},
])
def test_validation_agrees_with_mergekit(overrides: dict) -> None:
    text = config(**overrides)
    try:
        parse_recipe(text)
        ours = True
    except RecipeError:
        ours = False
    assert ours == _mergekit_accepts(text)


def test_cli_refuses_a_bad_config_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "moe.yml"
    path.write_text(config(gate_mode="hiden"))
    assert merger_main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: gate_mode 'hiden'") and err.count("\n") == 1


# ---------------------------------------------------------------- the check, from headers only

@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Header-only models (no tensor bytes): the check must not need any."""
    root = tmp_path_factory.mktemp("moe-headers")

    def make(name: str, family: str = "llama", **kw: object) -> Path:
        return make_tiny_model(root / name, family, header_only=True, **{"num_layers": 2, **kw})

    return {"base": make("base"), "a": make("a", seed=1), "b": make("b", seed=2), "wide": make("wide", hidden=32),
            "deep": make("deep", num_layers=3), "qwen": make("qwen", "qwen2"), "qwen_b": make("qwen_b", "qwen2", seed=3)}


def _local(headers: dict[str, Path], base: str, experts: list[str], **overrides: object) -> MoERecipe:
    text = yaml.safe_dump({"base_model": str(headers[base]), "gate_mode": "cheap_embed", "experts": [
        {"source_model": str(headers[e]), "positive_prompts": [f"prompt {i}"]} for i, e in enumerate(experts)],
        **overrides}, sort_keys=False)
    return parse_recipe(text)


def test_check_passes_from_headers_with_estimates(headers: dict[str, Path]) -> None:
    report = check_moe(_local(headers, "base", ["a", "b"], dtype="float32"), gguf_types=["Q8_0"])
    assert report.ok, report.to_text()
    assert "output: MixtralForCausalLM (Mixtral) with 2 experts, 2 per token" in report.to_text()
    # 2 layers x (attention 64*64*2 + 64*32*2 + norms 2*64 + 2 experts x 3 x 64*128 + router 2*64)
    # + embeddings and head 2*444*64 + final norm 64, in float32
    params = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 2 * 64 + 2 * 3 * 64 * 128 + 2 * 64) + 2 * 444 * 64 + 64
    assert report.estimates.output_bytes == params * 4


@pytest.mark.parametrize("base, experts, overrides, message", [
    ("base", ["a", "wide"], {}, r"mlp\.(gate|down|up)_proj\.weight is \[.*\] but the base model's is"),
    ("base", ["a", "qwen"], {}, "different architectures"),
    ("qwen", ["qwen", "qwen_b"], {}, "Qwen2 experts make a Qwen MoE, which needs exactly one shared_experts"),
    ("base", ["a", "b"], {"shared_experts": [{"source_model": "PLACEHOLDER"}]}, "would build a DeepSeek MoE"),
])
def test_check_refuses_what_mergekit_moe_cannot_build(headers: dict[str, Path], base: str, experts: list[str],
                                                      overrides: dict, message: str) -> None:
    if "shared_experts" in overrides:
        overrides = {"shared_experts": [{"source_model": str(headers["base"])}]}
    report = check_moe(_local(headers, base, experts, **overrides))
    assert not report.ok
    assert any(p.severity == "error" for p in report.problems)
    assert any(__import__("re").search(message, p.message) for p in report.problems), report.to_text()


def test_check_of_an_expert_with_fewer_layers(headers: dict[str, Path]) -> None:
    report = check_moe(_local(headers, "deep", ["a", "b"]))
    assert not report.ok and "has no model.layers.2.mlp" in report.to_text()
    deeper = check_moe(_local(headers, "base", ["deep", "a"]))
    assert deeper.ok and "its last 1 are unused" in deeper.to_text()


def test_strict_makes_ignored_keys_errors(headers: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "moe.yml"
    path.write_text(_local(headers, "base", ["a", "b"], experts_per_tokn=2).text)
    assert merger_main(["check", str(path)]) == 0
    assert "did you mean 'experts_per_token'?" in capsys.readouterr().out
    assert merger_main(["check", str(path), "--strict"]) == 1
    assert "did you mean 'experts_per_token'?" in capsys.readouterr().out
    assert merger_main(["run", str(path), str(tmp_path / "out"), "--strict", "--no-eval"]) != 0
    assert not (tmp_path / "out").exists()


def test_cli_check_of_a_moe_exits_0(headers: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "moe.yml"
    path.write_text(_local(headers, "qwen", ["qwen", "qwen_b"], shared_experts=[
        {"source_model": str(headers["qwen"]), "positive_prompts": ["hi"]}]).text)
    assert merger_main(["check", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["method"] == "moe" and len(report["models"]) == 2
    assert any("Qwen2MoeForCausalLM (Qwen MoE)" in p["message"] for p in report["problems"])


def test_check_refuses_gguf_llama_cpp_cannot_reproduce(headers: dict[str, Path]) -> None:
    """llama.cpp's qwen2moe has no tied head and no top-k renormalisation (measured: the GGUF of a 1-of-2 Qwen
    MoE fails verification with KL divergence 0.04); Mixtral is fine."""
    shared = [{"source_model": str(headers["base"]), "positive_prompts": ["hi"]}]
    one_of_two = check_moe(_local(headers, "base", ["a", "b"], shared_experts=shared, experts_per_token=1),
                           gguf_types=["Q8_0"])
    assert not one_of_two.ok and "does not renormalise" in one_of_two.to_text()
    assert check_moe(_local(headers, "base", ["a", "b"], shared_experts=shared), gguf_types=["Q8_0"]).ok
    assert check_moe(_local(headers, "base", ["a", "b"], shared_experts=shared, experts_per_token=1)).ok
    tied = [{"source_model": str(headers["qwen"]), "positive_prompts": ["hi"]}]
    report = check_moe(_local(headers, "qwen", ["qwen", "qwen_b"], shared_experts=tied), gguf_types=["Q8_0"])
    assert "needs an output head of its own" in report.to_text() and not report.ok
    assert check_moe(_local(headers, "base", ["a", "b"], experts_per_token=1), gguf_types=["Q8_0"]).ok


def test_check_of_hub_models_reads_headers_only(hub, llama_family: dict[str, Path]) -> None:  # noqa: ANN001
    """Hub parents: configs and safetensors headers by Range requests; no weight byte leaves the server."""
    for name in ("base", "chat", "code"):
        hub.upload_folder(llama_family[name], f"acme/{name}")
    hub.stats.__init__()
    report = check_moe(parse_recipe(config(base_model="acme/base", experts=[
        {"source_model": "acme/chat", "positive_prompts": ["x"]},
        {"source_model": "acme/code", "positive_prompts": ["y"]}])))
    assert report.ok, report.to_text()
    from merger.architecture import inspect_local

    assert report.estimates.download_bytes == sum(inspect_local(llama_family[n]).size_bytes for n in ("base", "chat",
                                                                                                      "code"))
    for name in ("base", "chat", "code"):
        served = hub.stats.bytes_served[(f"acme/{name}", "model.safetensors")]
        assert 0 < served < 100_000 < (llama_family[name] / "model.safetensors").stat().st_size


def test_run_with_hub_experts_pushes_the_moe_and_may_push_again(hub, llama_family: dict[str, Path],  # noqa: ANN001
                                                                 tmp_path: Path) -> None:
    """Hub parents are pinned and fetched, the MoE is pushed with its card and config; a second push to the
    same repo is allowed (this tool made it: mergekit_moe_config.yml and the tool's tag)."""
    from huggingface_hub import ModelCard, snapshot_download

    for name in ("base", "chat", "code"):
        hub.upload_folder(llama_family[name], f"acme/{name}")
    text = config(base_model="acme/base", gate_mode="cheap_embed", experts=[
        {"source_model": "acme/chat", "positive_prompts": ["x"]},
        {"source_model": "acme/code", "positive_prompts": ["y"]}])
    path = tmp_path / "moe.yml"
    path.write_text(text)
    token = "hf_alice_write"
    for attempt in (1, 2):
        args = ["run", str(path), str(tmp_path / "out"), "--push", "alice/tiny-moe", "--token", token, "--no-eval"]
        assert merger_main(args + (["--overwrite"] if attempt == 2 else [])) == 0
    pulled = Path(snapshot_download("alice/tiny-moe", cache_dir=tmp_path / "pull", token=token, endpoint=hub.url))
    assert (pulled / "mergekit_moe_config.yml").read_text() == text
    assert json.loads((pulled / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    card = ModelCard((pulled / "README.md").read_text())
    assert card.data.base_model == ["acme/base", "acme/chat", "acme/code"]
    assert {"moe", "mergekit-moe", "llm-merger"} <= set(card.data.tags)
    assert "| 0 | [acme/chat](https://huggingface.co/acme/chat) |" in card.text


def test_a_moe_on_the_hub_gives_its_config_for_a_remix(hub) -> None:  # noqa: ANN001
    from merger.app.gallery import recipe_from_hub

    text = config()
    hub.create_repo("acme/moe-file")
    hub.commit_files("acme/moe-file", {"mergekit_moe_config.yml": text.encode()})
    assert recipe_from_hub("acme/moe-file") == text
    hub.create_repo("acme/moe-card")
    hub.commit_files("acme/moe-card", {"README.md": f"# A MoE\n\n```yaml\n{text}```\n".encode()})
    assert recipe_from_hub("acme/moe-card") == text


def test_noise_is_reproducible_from_the_seed() -> None:
    import torch

    from merger.moe.assemble import expert_tensor
    from merger.moe.config import Expert
    from merger.moe.plan import MoEOutput
    from merger.recipe import ModelRef

    expert = Expert(ModelRef(A), ("x",), noise_scale=0.1, residual_scale=2.0)
    down = MoEOutput("model.layers.0.block_sparse_moe.experts.0.w2.weight", (256, 512), ModelRef(A), "n", expert,
                     residual=True)
    zeros = torch.zeros(256, 512)
    first, again, other = (expert_tensor(zeros, down, seed) for seed in (1, 1, 2))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert abs(first.std().item() - 0.2) < 0.005  # noise_scale 0.1, then residual_scale 2
    up = MoEOutput("model.layers.0.block_sparse_moe.experts.0.w3.weight", (256, 512), ModelRef(A), "n", expert)
    assert abs(expert_tensor(zeros, up, 1).std().item() - 0.1) < 0.003  # no residual_scale off down_proj


# ---------------------------------------------------------------- the app and the card

def test_gallery_moe_recipe_runs_on_the_demo_models(tmp_path: Path) -> None:
    """The gallery's MoE config, with the demo's three models put in, is checked and built by an app job
    offline: a Mixtral that transformers loads, with the experts' MLPs and a card listing them."""
    models = [str(p) for p in demo.ensure_demo_models(tmp_path / "demo").values()]
    entry = next(e for e in load_gallery() if e.key == "moe-two-experts.yml")
    text = demo.gallery_recipe(entry.text, models)
    assert [str(r.repo) for r in parse_recipe(text).referenced_models()] == models
    assert demo.recipe_status(text, allow_local=True).startswith("✓ valid recipe: `moe` of 3 model(s)")
    settings = demo.Settings(space=False, host="127.0.0.1", port=0, outputs_dir=tmp_path / "outputs",
                             demo_dir=tmp_path / "demo")
    assert demo.check_report(settings, text, (), None).ok
    manager = RunQueue()
    job = manager.new_job()
    request = demo.job_request(settings, text, "", private=False, publish=False, quants=(), token=None,
                               job_id=job.job_id)
    assert request.options.out_dir.name == "base-chat-code-moe"
    job.start(request.recipe, request.options, job_dir=request.job_dir, keep=request.keep)
    assert job.wait(300)
    snap = job.snapshot()
    assert snap.status == DONE, snap.error
    out = snap.outcome.out_dir
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["num_local_experts"], config["dtype"]) == (
        ["MixtralForCausalLM"], 2, "bfloat16")
    card = (out / "README.md").read_text()
    assert "A mixture of experts made from a mergekit-moe config" in card
    assert "| 1 | `code` (local) |" in card and "code; python; javascript" in card
    assert (out / "mergekit_moe_config.yml").read_text() == text
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model).__name__ == "MixtralForCausalLM"
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
