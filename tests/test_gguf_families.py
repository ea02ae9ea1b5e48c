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


@pytest.mark.parametrize("family", FAMILIES)
def test_family_merges_like_mergekit_and_exports_the_gguf_llama_cpp_writes(
        family: str, tmp_path: Path, llama_cpp_converter: Path) -> None:
    base = make_tiny_model(tmp_path / "base", family, num_layers=2, dtype=torch.float32, seed=1)
    tuned = make_tiny_model(tmp_path / "tuned", perturb_from=base, seed=2, perturb_scale=0.05)
    info = inspect_local(base)
    assert info.family is not None and info.family.name == family
    assert info.missing == [] and info.unexpected == []  # the table names what save_pretrained writes

    # mergekit 0.1.5 merges MoE experts as one fused tensor per layer (TIES would trim over all experts at
    # once there, per expert here), so MoE families are compared on an elementwise method
    method = "linear" if family in MOE else "ties"
    density = "" if family in MOE else ", density: 0.5"
    text = (f"models:\n  - model: {base}\n    parameters: {{weight: 0.6}}\n  - model: {tuned}\n"
            f"    parameters: {{weight: 0.4{density}}}\nmerge_method: {method}\nbase_model: {base}\n"
            "dtype: float32\n")
    result = run(parse_recipe(text), RunOptions(out_dir=tmp_path / "ours", device="cpu", gguf=("F32",)))
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "theirs"),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    ours, theirs = canonical_weights(result.out_dir), canonical_weights(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=2e-6, atol=1e-7, msg=name)
    if family in MOE:  # mergekit wrote the fused layout; ours keeps the checkpoint's per-expert one
        assert any(n.endswith("experts.gate_up_proj") for n in load_file(tmp_path / "theirs" / "model.safetensors"))
        assert not any("gate_up_proj" in n for n in load_file(result.out_dir / "model.safetensors"))

    (gguf_file,) = result.gguf_files
    assert stream_reason(json.loads((result.out_dir / "config.json").read_text())) is not None
    # the converter ran on the merged folder before the model card was added (it reads general.* keys from
    # it, and from the folder's name)
    merged = tmp_path / "reference" / result.out_dir.name
    shutil.copytree(result.out_dir, merged, ignore=shutil.ignore_patterns("*.gguf", "README.md"))
    assert_same_gguf(gguf_file, llama_cpp_reference(llama_cpp_converter, merged, tmp_path / "ref.gguf"))
    assert_special_ids(gguf_file, result.out_dir)
    verified = result.sanity[gguf_file.name]
    error = float(verified.split("max rel. error ")[1].split(";")[0])
    assert error < 5e-4, verified  # F32 in llama.cpp vs transformers: 4e-7, 2e-4 with ggml's F16 GELU table


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
