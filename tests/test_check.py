"""The pre-flight check: each problem it exists for produces its message, from headers alone."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merger import architecture as arch
from merger.budget import BASE_RAM, CUDA_CONTEXT, REDUCTION_BYTES
from merger.check import GGUF_BITS, Inspection, check_recipe
from merger.methods import get_method
from merger.recipe import InputModel, ModelRef, Recipe, Slice
from merger.sources import read_local_headers
from merger.app.tiny import make_tiny_model


def local(path: Path) -> ModelRef:
    return ModelRef(str(path), None, True)


def recipe(method: str, models: list[ModelRef], *, base: ModelRef | None = None,
           slices: list[list[tuple[ModelRef, tuple[int, int]]]] | None = None,
           tokenizer_source: str | ModelRef | None = None, out_dtype: str | None = None) -> Recipe:
    """A Recipe built directly, so that the check sees what the parser would refuse too; the method's
    required parameters get a valid value (0.5) at the top level."""
    built = None
    if slices is not None:
        built = tuple(Slice(tuple(InputModel(m, {}, r) for m, r in s)) for s in slices)
    required = {p.name: 0.5 for p in get_method(method).params if p.required}
    return Recipe(method, base, tuple(InputModel(m) for m in models), built, required, None, out_dtype,
                  tokenizer_source, None, "")


def messages(report, severity: str | None = None) -> list[str]:
    return [p.message for p in report.problems if severity is None or p.severity == severity]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = make_tiny_model(root / "llama", "llama", num_layers=2, header_only=True)
    return {
        "llama": base,
        "llama_ft": make_tiny_model(root / "llama_ft", "llama", num_layers=2, seed=1, header_only=True),
        "llama3": make_tiny_model(root / "llama3", "llama", num_layers=3, header_only=True),
        "llama_wide": make_tiny_model(root / "llama_wide", "llama", num_layers=2, hidden=32, header_only=True),
        "llama_vocab": make_tiny_model(root / "llama_vocab", "llama", num_layers=2, vocab=500, header_only=True),
        "qwen2": make_tiny_model(root / "qwen2", "qwen2", num_layers=2, header_only=True),
        "phi": make_tiny_model(root / "phi", "phi", num_layers=2),
        "phi_legacy": make_tiny_model(root / "phi_legacy", "phi", num_layers=2, layout="legacy", seed=2),
    }


def test_header_only_finetunes_pass(models) -> None:
    a, b = local(models["llama"]), local(models["llama_ft"])
    report = check_recipe(recipe("ties", [a, b], base=a))
    assert report.ok, report.to_text()
    info = report.models[a]
    assert info.architecture == "LlamaForCausalLM" and info.num_layers == 2
    e = report.estimates
    assert e.download_bytes == 0  # local folders are not fetched
    assert e.output_bytes == info.param_count * 2  # float16 like the inputs
    largest = max(t.numel for t in info.tensors.values())
    # the budget holds the whole largest tensor: per entry, 2 fp16 reads (2 B each), 2 fp16 output
    # blocks (2 B each), 2 fp32 inputs and ties' 2 + 4 fp32 temporaries (4 B each): 40 B; plus the base
    assert e.merge_ram_bytes == BASE_RAM + REDUCTION_BYTES + largest * 40
    assert e.merge_vram_bytes == CUDA_CONTEXT + REDUCTION_BYTES + largest * (2 * 2 * 4 + (2 + 4) * 4 + 2)
    bounded = check_recipe(recipe("ties", [a, b], base=a), max_memory=2 * 400 * 40).estimates  # 400 entries
    assert bounded.merge_ram_bytes == BASE_RAM + REDUCTION_BYTES + 400 * 40 < e.merge_ram_bytes


def test_different_architectures(models) -> None:
    a, b = local(models["llama"]), local(models["qwen2"])
    report = check_recipe(recipe("linear", [a, b]))
    assert not report.ok
    assert f"Qwen2ForCausalLM ({b}) cannot be merged with LlamaForCausalLM ({a})" in messages(report, "error")


def test_different_layer_counts_suggest_slices(models) -> None:
    a, b = local(models["llama"]), local(models["llama3"])
    report = check_recipe(recipe("linear", [a, b]))
    problem = next(p for p in report.problems if "different layer counts" in p.message)
    assert f"{a}: 2" in problem.message and f"{b}: 3" in problem.message
    assert "slices" in problem.fix and "layer_range" in problem.fix


def test_shape_mismatch_names_tensor_and_shapes(models) -> None:
    a, b = local(models["llama"]), local(models["llama_wide"])
    report = check_recipe(recipe("linear", [a, b]))
    rows = report.models[a].embedding_rows
    problem = next(p for p in report.problems if p.message.startswith("shape mismatch: "))
    assert f"lm_head.weight has shape [{rows}, 64] in {a} but [{rows}, 32] in {b}" in problem.message
    assert f"model.layers.0.input_layernorm.weight has shape [64] in {a} but [32] in {b}" in problem.message
    assert problem.message.endswith(" more)") and "same size" in problem.fix


def test_vocab_difference_is_refused_with_the_tokenizer_setting_to_add(models) -> None:
    """mergekit 0.1.5 refuses differing vocabularies without a tokenizer setting; so do we, naming the fix."""
    a, b = local(models["llama"]), local(models["llama_vocab"])
    rows = arch.inspect_local(models["llama"], check_size=False).embedding_rows
    report = check_recipe(recipe("linear", [a, b]))
    assert not report.ok
    error = next(p for p in report.problems if p.severity == "error" and "vocab sizes differ" in p.message)
    assert f"{rows} rows common to all" in error.message and "no tokenizer setting" in error.message
    assert f"add 'tokenizer_source: {b}'" in error.fix  # no base: the model with the larger vocabulary
    with_base = check_recipe(recipe("ties", [a, b], base=a))
    assert "add 'tokenizer_source: base' to keep the tokenizer of" in next(
        p.fix for p in with_base.problems if "vocab sizes differ" in p.message)
    with_source = check_recipe(recipe("linear", [a, b], tokenizer_source=b))
    assert any("rebuilt for the tokenizer" in m for m in messages(with_source, "note"))


def test_layer_range_out_of_bounds(models) -> None:
    a = local(models["llama"])
    report = check_recipe(recipe("passthrough", [], slices=[[(a, (0, 2))], [(a, (1, 3))]]))
    assert f"slices[1]: layer_range [1, 3] of {a} is out of bounds; it has 2 layers" in messages(report, "error")


def test_passthrough_slices_estimate_counts_output_layers(models) -> None:
    a = local(models["llama"])
    report = check_recipe(recipe("passthrough", [], slices=[[(a, (0, 2))], [(a, (0, 2))]]))
    assert report.ok, report.to_text()
    info = report.models[a]
    layer = sum(t.numel for n, t in info.tensors.items() if arch.layer_index(n) is not None)
    assert report.estimates.output_bytes == (info.param_count + layer) * 2


def test_method_needs_base_model(models) -> None:
    a, b = local(models["llama"]), local(models["llama_ft"])
    report = check_recipe(recipe("ties", [a, b]))
    problem = next(p for p in report.problems if "needs a base model" in p.message)
    assert problem.severity == "error" and "base_model" in problem.fix


def test_slerp_needs_exactly_two_models(models) -> None:
    a, b, c = local(models["llama"]), local(models["llama_ft"]), local(models["llama_vocab"])
    report = check_recipe(recipe("slerp", [a, b, c], base=a))
    assert "slerp merges exactly 2 models (base included); models has 3" in messages(report, "error")


def test_remote_code_is_refused(models, tmp_path) -> None:
    folder = tmp_path / "custom"
    folder.mkdir()
    config = json.loads((models["llama"] / "config.json").read_text())
    config.update(model_type="custom_llama", architectures=["CustomForCausalLM"],
                  auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").symlink_to(models["llama"] / "model.safetensors")
    report = check_recipe(recipe("linear", [local(folder), local(folder)]))
    problem = next(p for p in report.problems if "remote code" in p.message)
    assert problem.severity == "error" and "never executed" in problem.message


def test_legacy_phi_is_a_note_and_merges_with_new_layout(models) -> None:
    a, b = local(models["phi"]), local(models["phi_legacy"])
    report = check_recipe(recipe("linear", [a, b]))
    assert report.ok, report.to_text()
    assert any(m.startswith(f"{b} is converted from the legacy phi-msft layout") for m in messages(report, "note"))
    assert "phi-msft (legacy, converted)" in report.to_text()


def test_missing_tensor_is_named(models, tmp_path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text((models["phi"] / "config.json").read_text())
    tensors = load_file(str(models["phi"] / "model.safetensors"))
    del tensors["model.final_layernorm.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    a, b = local(models["phi"]), local(folder)
    report = check_recipe(recipe("linear", [a, b]))
    assert f"model.final_layernorm.weight is missing in {b}" in messages(report, "error")
    assert f"model.final_layernorm.weight is missing in {b} (present in {a})" in messages(report, "error")


def test_bin_only_model(models, tmp_path) -> None:
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((models["phi"] / "config.json").read_text())
    torch.save(load_file(str(models["phi"] / "model.safetensors")), folder / "pytorch_model.bin")
    a, b = local(models["phi"]), local(folder)
    refused = check_recipe(recipe("linear", [a, b]))
    assert not refused.ok and any("--allow-bin" in m for m in messages(refused, "error"))
    allowed = check_recipe(recipe("linear", [a, b]), allow_bin=True)
    assert allowed.ok, allowed.to_text()
    assert any("pickle .bin" in m for m in messages(allowed, "note"))


def test_gguf_unsupported_architecture(models, monkeypatch) -> None:
    fake = types.ModuleType("quantize.convert")
    fake.check_convertible = lambda config: (f"{config['architectures'][0]} has no GGUF converter"
                                             if config["model_type"] == "qwen2" else None)
    monkeypatch.setitem(sys.modules, "quantize.convert", fake)
    q = local(models["qwen2"])
    report = check_recipe(recipe("linear", [q, q]), gguf_types=["q4_k_m"])
    assert "GGUF export: Qwen2ForCausalLM has no GGUF converter" in messages(report, "error")
    a = local(models["llama"])
    ok = check_recipe(recipe("linear", [a, a]), gguf_types=["Q4_K_M", "Q8_0"])
    assert ok.ok
    params = ok.models[a].param_count
    expected = params * (GGUF_BITS["Q4_K_M"] + GGUF_BITS["Q8_0"] + 16) / 8  # + the intermediate F16
    assert ok.estimates.gguf_bytes == int(expected)
    assert ok.estimates.disk_bytes == ok.estimates.output_bytes + ok.estimates.gguf_bytes


def test_hub_models_through_inspector_report_access_and_download(models) -> None:
    """Hub refs are inspected by the injected callable (header-only Hub reads in production)."""
    config = json.loads((models["llama"] / "config.json").read_text())
    headers = read_local_headers(models["llama"], check_size=False)
    refs = [ModelRef("org/base", "main"), ModelRef("org/chat")]

    def inspect(ref: ModelRef) -> Inspection:
        return Inspection(arch.model_info_from(config, headers, ref), "gated (granted)", "llama3")

    report = check_recipe(recipe("slerp", refs, base=refs[0]), inspect=inspect)
    assert report.ok, report.to_text()
    size = report.models[refs[0]].size_bytes
    assert report.estimates.download_bytes == 2 * size
    text = report.to_text()
    assert "org/base@main" in text and "gated (granted)" in text and "LlamaForCausalLM" in text
    data = json.loads(report.to_json())
    assert data["ok"] is True and [m["ref"] for m in data["models"]] == ["org/base@main", "org/chat"]
    assert data["models"][0]["license"] == "llama3"
    assert data["estimates"]["download_bytes"] == 2 * size


def test_inspection_failure_becomes_a_problem(models) -> None:
    missing = ModelRef("/nonexistent/model", None, True)
    report = check_recipe(recipe("linear", [local(models["llama"]), missing]))
    assert not report.ok
    assert any(m.startswith("/nonexistent/model: ") and "config.json" in m for m in messages(report, "error"))
