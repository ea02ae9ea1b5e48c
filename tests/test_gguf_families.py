"""GGUF for the families people merge (issue #18): Llama 3.x rope scaling in both config spellings,
special-token ids through `run --gguf`, and every family of the tables merged (parity with mergekit
0.1.5) and exported (equal to llama.cpp's own converter, bos/eos/pad present, logits verified)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from merger.app.tiny import make_tiny_model
from merger.architecture import inspect_local
from merger.pipeline import RunOptions, merge_local, resolve_local, run
from merger.recipe import parse_recipe
from quantize.convert import convert_folder, stream_reason
from quantize.llama import load_gguf
from tests.conftest import LLAMA_CPP_DRIVER

import transformers  # noqa: E402  (the logits reference)
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

SPECIAL_KEYS = ("bos", "eos", "padding")  # GGUF key names; config.json calls the last one pad_token_id


def llama_cpp_reference(converter: Path, folder: Path, out: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py on `folder`, F32 (tiny tokenizers are named gpt-2 by the test driver)."""
    ran = subprocess.run([sys.executable, "-c", LLAMA_CPP_DRIVER, str(converter), str(folder), "--outtype", "f32",
                          "--outfile", str(out)], capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-2000:]
    return out


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith(("GGUF.", "general.name"))}


def assert_same_gguf(ours: Path, theirs: Path, extra_keys: tuple[str, ...] = ()) -> None:
    """Same tensors (names, types, shapes, bytes) and the same metadata; `extra_keys` (without the
    architecture prefix) may be written by us only."""
    mine, ref = fields(ours), fields(theirs)
    assert {k: mine.get(k) for k in ref} == ref
    arch = ref["general.architecture"]
    assert all(k.removeprefix(arch + ".") in extra_keys for k in set(mine) - set(ref)), set(mine) - set(ref)
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert a.keys() == b.keys()
    for name, t in b.items():
        assert a[name].tensor_type == t.tensor_type and list(a[name].shape) == list(t.shape), name
        np.testing.assert_array_equal(np.asarray(a[name].data), np.asarray(t.data), err_msg=name)


def assert_special_ids(path: Path, folder: Path) -> None:
    """bos/eos/pad ids of config.json are in the GGUF (where config.json has an id below the vocab size)."""
    config, value = json.loads((folder / "config.json").read_text()), fields(path)
    found = 0
    for key, name in zip(SPECIAL_KEYS, ("bos", "eos", "pad")):
        tid = config.get(f"{name}_token_id")
        if isinstance(tid, int):
            assert value[f"tokenizer.ggml.{key}_token_id"] == tid, key
            found += 1
    assert found >= 2


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------------------------- Llama 3.1

LONG = 600  # tokens: past the tiny model's original_max_position_embeddings (64), where llama3 scaling acts
IDS = [int(i) for i in torch.randint(4, 400, (LONG,), generator=torch.Generator().manual_seed(7))]


@pytest.fixture(scope="module")
def llama31(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Llama-3.1-style tiny model saved by transformers 5 (rope_parameters) and the same model with
    the transformers-4 spelling Hub configs have (rope_scaling + top-level rope_theta)."""
    root = tmp_path_factory.mktemp("llama31")
    new = make_tiny_model(root / "rope_parameters", "llama3", num_layers=2, dtype=torch.float32)
    old = root / "rope_scaling"
    shutil.copytree(new, old)
    config = json.loads((old / "config.json").read_text())
    scaling = config.pop("rope_parameters")
    config["rope_theta"] = scaling.pop("rope_theta")
    config["rope_scaling"] = scaling
    (old / "config.json").write_text(json.dumps(config, indent=2))
    return {"rope_parameters": new, "rope_scaling": old}


def hf_logits(folder: Path, **overrides: object) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **overrides)
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].double().numpy()


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
def test_llama31_logits_in_llama_cpp_equal_transformers_at_16_and_600_tokens(llama31, tmp_path: Path,
                                                                             spelling: str) -> None:
    folder = llama31[spelling]
    assert stream_reason(json.loads((folder / "config.json").read_text())) is None  # streamed, one pass
    (path,) = convert_folder(folder, tmp_path / "m.gguf", "f32")
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    llm = load_gguf(path, n_ctx=1024)
    try:
        llm.eval(IDS)
        got = np.array(llm.scores[:LONG], dtype=np.float64)
    finally:
        llm.close()
    ref = hf_logits(folder)
    assert rel(got[:16], ref[:16]) < 1e-5
    assert rel(got, ref) < 1e-5  # measured 5e-7 (F32 weights, F32 KV cache)
    plain = hf_logits(folder, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert rel(plain, ref) > 1e-2  # without the scaling the long-context logits are far off: the test sees it


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
def test_llama31_gguf_equals_llama_cpp_converter(llama31, tmp_path: Path, llama_cpp_converter: Path,
                                                 spelling: str) -> None:
    theirs = llama_cpp_reference(llama_cpp_converter, llama31[spelling], tmp_path / "theirs.gguf")
    (ours,) = convert_folder(llama31[spelling], tmp_path / "ours.gguf", "f32")
    assert_same_gguf(ours, theirs, extra_keys=("rope.freq_base",))
    assert_special_ids(ours, llama31[spelling])


def test_yarn_scaling_goes_through_llama_cpps_converter_and_matches_transformers(tmp_path: Path) -> None:
    """Qwen2.5's long-context setting: YaRN, which the streaming converter leaves to llama.cpp's converter."""
    folder = make_tiny_model(tmp_path / "qwen2", "qwen2", num_layers=2, dtype=torch.float32)
    config = json.loads((folder / "config.json").read_text())
    config.update(max_position_embeddings=256,
                  rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    (folder / "config.json").write_text(json.dumps(config))
    assert stream_reason(config) is not None
    (path,) = convert_folder(folder, tmp_path / "m.gguf", "f32")
    value = fields(path)
    assert value["qwen2.rope.scaling.type"] == "yarn" and value["qwen2.rope.scaling.factor"] == 4.0
    assert value["qwen2.rope.scaling.original_context_length"] == 64
    llm = load_gguf(path, n_ctx=1024)
    try:
        llm.eval(IDS)
        got = np.array(llm.scores[:LONG], dtype=np.float64)
    finally:
        llm.close()
    ref = hf_logits(folder)
    assert rel(got[:16], ref[:16]) < 1e-5 and rel(got, ref) < 1e-5  # measured 5e-7 and 9e-7


# ------------------------------------------------------------------------- special ids in one pass

@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_run_gguf_keeps_special_ids_only_config_json_carries(tmp_path: Path, llama_cpp_converter: Path,
                                                             family: str) -> None:
    """The streamed GGUF is written before config.json exists; ids found only there must still arrive."""
    base = make_tiny_model(tmp_path / "base", family, num_layers=2, dtype=torch.float32, seed=1,
                           tokenizer="sentencepiece")  # what their Hub repos ship (llama.cpp's Gemma 2 needs it)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # as many Hub repos: ids in config.json only
        data = json.loads((base / name).read_text())
        for key in ("bos_token", "eos_token", "pad_token"):
            data.pop(key, None)
        (base / name).write_text(json.dumps(data))
    config = json.loads((base / "config.json").read_text())
    config["pad_token_id"] = config.get("pad_token_id") if config.get("pad_token_id") is not None else 0
    (base / "config.json").write_text(json.dumps(config))
    tuned = make_tiny_model(tmp_path / "tuned", perturb_from=base, seed=2, perturb_scale=0.05)
    recipe = parse_recipe(f"models:\n  - model: {base}\n  - model: {tuned}\nmerge_method: slerp\n"
                          f"base_model: {base}\nparameters: {{t: 0.3}}\ndtype: float32\n")
    result = run(recipe, RunOptions(out_dir=tmp_path / "out", device="cpu", gguf=("F32",)))
    (ours,) = result.gguf_files
    assert_special_ids(ours, result.out_dir)
    theirs = llama_cpp_reference(llama_cpp_converter, result.out_dir, tmp_path / "theirs.gguf")
    mine, ref = fields(ours), fields(theirs)
    for key in SPECIAL_KEYS:
        assert mine.get(f"tokenizer.ggml.{key}_token_id") == ref.get(f"tokenizer.ggml.{key}_token_id"), key


# -------------------------------------------------------------------------- every family of the tables

# The families built with transformers' classes (merger/app/tiny_hf.py) whose GGUF llama.cpp's converter writes.
FAMILIES = ["olmo2", "granite", "cohere", "gemma3", "starcoder2", "stablelm", "qwen2_moe", "qwen3_moe", "mixtral"]
MOE = {"qwen2_moe", "qwen3_moe", "mixtral"}


def canonical_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder under its canonical name (fused expert tensors split per expert)."""
    from merger.sources import TensorReader

    info = inspect_local(folder)
    with TensorReader(folder) as reader:
        return {name: reader.read(ref.source_name, ref.rows).clone() for name, ref in info.tensors.items()}


def pair_and_recipe(family: str, root: Path) -> str:
    """A tiny base and fine-tune of `family`, and a recipe merging them: TIES, or linear for MoE families
    (mergekit 0.1.5 merges experts as one fused tensor per layer, so TIES would trim over all experts at
    once there and per expert here)."""
    base = make_tiny_model(root / "base", family, num_layers=2, dtype=torch.float32, seed=1)
    tuned = make_tiny_model(root / "tuned", perturb_from=base, seed=2, perturb_scale=0.05)
    method, density = ("linear", "") if family in MOE else ("ties", ", density: 0.5")
    return (f"models:\n  - model: {base}\n    parameters: {{weight: 0.6}}\n  - model: {tuned}\n"
            f"    parameters: {{weight: 0.4{density}}}\nmerge_method: {method}\nbase_model: {base}\n"
            "dtype: float32\n")


# mergekit 0.1.5's cohere table requires Command-R+'s q/k norms; Command-R v01 is compared in that layout
@pytest.mark.parametrize("family", [f if f != "cohere" else "cohere_plus" for f in FAMILIES])
def test_family_merges_like_mergekit(family: str, tmp_path: Path) -> None:
    text = pair_and_recipe(family, tmp_path)
    info = inspect_local(tmp_path / "base")
    assert info.family is not None and info.family.name == family.removesuffix("_plus")
    assert info.missing == [] and info.unexpected == []  # the table names what save_pretrained writes
    recipe = parse_recipe(text)
    ours_dir = merge_local(recipe, resolve_local(recipe), tmp_path / "ours", device="cpu").out_dir
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "theirs"),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    ours, theirs = canonical_weights(ours_dir), canonical_weights(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=2e-6, atol=1e-7, msg=name)
    if family in MOE:  # mergekit wrote the fused layout; ours keeps the checkpoint's per-expert one
        assert any(n.endswith("experts.gate_up_proj") for n in load_file(tmp_path / "theirs" / "model.safetensors"))
        assert not any("gate_up_proj" in n for n in load_file(ours_dir / "model.safetensors"))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_run_gguf_is_what_llama_cpp_writes(family: str, tmp_path: Path, llama_cpp_converter: Path) -> None:
    text = pair_and_recipe(family, tmp_path)
    result = run(parse_recipe(text), RunOptions(out_dir=tmp_path / "ours", device="cpu", gguf=("F32",)))
    (gguf_file,) = result.gguf_files
    assert stream_reason(json.loads((result.out_dir / "config.json").read_text())) is not None
    # the converter ran on the merged folder before the model card was added (it reads general.* keys from
    # it, and from the folder's name)
    merged = tmp_path / "reference" / result.out_dir.name
    shutil.copytree(result.out_dir, merged, ignore=shutil.ignore_patterns("*.gguf", "README.md"))
    assert_same_gguf(gguf_file, llama_cpp_reference(llama_cpp_converter, merged, tmp_path / "ref.gguf"))
    assert_special_ids(gguf_file, result.out_dir)
    verified = result.sanity[gguf_file.name]
    assert verified.startswith("✓ pass: vs safetensors model: mean KLD "), verified  # against transformers
    kld = float(verified.split("mean KLD ")[1].split(" ")[0])
    assert kld < 1e-5, verified  # F32 in llama.cpp vs transformers (ggml's F16 GELU table is the largest gap)


def test_unknown_bpe_pre_tokenizer_is_refused_in_one_line(tmp_path: Path) -> None:
    """llama.cpp knows BPE tokenizers by a hash of their output; one it has no hash for is named from
    tokenizer.json's pre-tokenizer rule (as the streaming converter does), or refused when that is unknown too."""
    from merger.errors import GGUFError

    folder = make_tiny_model(tmp_path / "olmo2", "olmo2", num_layers=1, dtype=torch.float32)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}+|[a-z]+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(GGUFError, match="pre-tokenizer llama.cpp does not know") as refused:
        convert_folder(folder, tmp_path / "out" / "m.gguf", "f32")
    assert "\n" not in str(refused.value) and list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("family", sorted(MOE))
def test_parents_in_the_fused_expert_layout_merge_per_expert(family: str, tmp_path: Path) -> None:
    """A parent saved with fused experts (transformers 5 in memory, mergekit 0.1.5's output) merges with
    one in the Hub's per-expert layout; the result keeps the per-expert layout."""
    base = make_tiny_model(tmp_path / "base", family, num_layers=2, dtype=torch.float32, seed=1)
    fused = tmp_path / "fused"
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    shutil.copytree(base, fused, ignore=shutil.ignore_patterns("*.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, fused / "model.safetensors",
              metadata={"format": "pt"})
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in load_file(fused / "model.safetensors"))
    assert canonical_weights(fused).keys() == canonical_weights(base).keys()
    for name, tensor in canonical_weights(fused).items():
        assert torch.equal(tensor, canonical_weights(base)[name]), name
    recipe = parse_recipe(f"models:\n  - model: {fused}\n    parameters: {{weight: 0.5}}\n  - model: {base}\n"
                          "    parameters: {weight: 0.5}\nmerge_method: linear\ndtype: float32\n")
    out = merge_local(recipe, resolve_local(recipe), tmp_path / "out", device="cpu")
    merged = load_file(out.out_dir / "model.safetensors")
    saved = load_file(base / "model.safetensors")
    assert merged.keys() == saved.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------ tables, README

def test_readme_table_is_what_the_tables_say() -> None:
    from quantize.support import END, README, START, markdown_table

    text = README.read_text(encoding="utf-8")
    assert text.split(START, 1)[1].split(END, 1)[0].strip() == markdown_table()


def test_every_gguf_family_is_a_merge_family_with_a_test() -> None:
    from merger.families import FAMILIES as TABLES
    from quantize.convert import LLAMA_CPP_ARCHITECTURES, supported_architectures

    by_arch = {f.architectures[0]: f.name for f in TABLES}
    assert set(supported_architectures()) | set(LLAMA_CPP_ARCHITECTURES) <= set(by_arch)
    assert {by_arch[a] for a in LLAMA_CPP_ARCHITECTURES} == set(FAMILIES)  # each one is exported in a test above


@pytest.mark.parametrize("config, streamed, exportable", [
    ({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, True, True),
    ({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"type": "linear", "factor": 2.0}}, True, True),
    ({"architectures": ["LlamaForCausalLM"], "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, False, True),
    ({"architectures": ["Phi3ForCausalLM"], "rope_scaling": {"type": "longrope"}}, False, True),
    ({"architectures": ["Qwen2ForCausalLM"], "rope_parameters": {"rope_type": "llama3"}}, False, True),
    ({"architectures": ["Olmo2ForCausalLM"]}, False, True),
    ({"architectures": ["FalconForCausalLM"]}, False, False),
    ({"architectures": ["CohereForCausalLM"], "use_qk_norm": True}, False, False),
])
def test_streamed_or_llama_cpp_or_refused(config: dict, streamed: bool, exportable: bool) -> None:
    from quantize.convert import check_convertible

    assert (stream_reason(config) is None) == streamed
    reason = check_convertible(config)
    assert (reason is None) == exportable
    if reason and "Falcon" in reason:
        assert "Olmo2ForCausalLM" in reason  # the refusal names what is supported


def test_rope_parameters_read_in_both_spellings() -> None:
    from quantize.rope import llama3_factors, rope_parameters

    old = {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
           "hidden_size": 2048, "num_attention_heads": 32}
    new = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
           "hidden_size": 2048, "num_attention_heads": 32}
    assert rope_parameters(old)["rope_type"] == rope_parameters(new)["rope_type"] == "llama3"
    assert rope_parameters(old)["rope_theta"] == rope_parameters(new)["rope_theta"] == 500000.0
    factors = llama3_factors(new)
    assert torch.equal(factors, llama3_factors(old)) and factors.shape == (32,)
    # Llama 3.2 1B's published rope_freqs: high frequencies kept, low ones divided by 8, a smooth band between
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers import LlamaConfig

    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(hidden_size=2048, num_attention_heads=32,
                                                         rope_parameters=new["rope_parameters"]), "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    torch.testing.assert_close(plain / factors, inv.float(), rtol=1e-6, atol=0)
