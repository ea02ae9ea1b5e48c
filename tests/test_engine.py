"""The engine end to end on tiny models: expected tensors computed independently in float64."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merger.engine import tensor_seed
from merger.errors import CancelledError, ModelError, RecipeError
from merger.pipeline import merge_local, resolve_local
from merger.recipe import parse_recipe
from merger.app.tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[1]


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def merge(text: str, out: Path, **kw) -> object:
    recipe = parse_recipe(text)
    return merge_local(recipe, resolve_local(recipe), out, **kw)


def layer_t(name: str, n: int) -> float:
    parts = name.split(".")
    if "layers" not in parts:
        return 0.0
    return int(parts[parts.index("layers") + 1]) / (n - 1)


def test_linear_with_gradient_matches_float64_formula(tmp_path: Path, llama_family) -> None:
    a, b = llama_family["base"], llama_family["chat"]
    result = merge(f"""
models:
  - model: {a}
    parameters: {{weight: [1, 0]}}
  - model: {b}
    parameters: {{weight: 1}}
merge_method: linear
dtype: float32
""", tmp_path / "out")
    A, B, out = load_weights(a), load_weights(b), load_weights(tmp_path / "out")
    assert set(out) == set(A)
    for name, got in out.items():
        t = layer_t(name, 4)
        wa, wb = 1 - t, 1.0
        expected = (wa * A[name].double() + wb * B[name].double()) / (wa + wb)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)
    assert result.plan.num_layers == 4


def _slerp64(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    a, b = v0.double().flatten(), v1.double().flatten()
    dot = torch.dot(a / a.norm(), b / b.norm()).clamp(-1, 1)
    if dot.abs() > 0.9995:
        res = (1 - t) * a + t * b
    else:
        theta = torch.arccos(dot)
        res = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return res.reshape(v0.shape)


def test_slerp_on_q_proj_only_keeps_the_base_elsewhere(tmp_path: Path, llama_family) -> None:
    a, b = llama_family["base"], llama_family["med"]
    merge(f"""
models:
  - model: {a}
  - model: {b}
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: q_proj
      value: 0.5
    - value: 0
dtype: float32
""", tmp_path / "out")
    A, B, out = load_weights(a), load_weights(b), load_weights(tmp_path / "out")
    for name, got in out.items():
        if "q_proj" in name:
            torch.testing.assert_close(got.double(), _slerp64(0.5, A[name].float(), B[name].float()), rtol=0, atol=1e-5)
            assert not torch.equal(got, A[name].float())
        else:
            assert torch.equal(got, A[name].float()), name


def test_ties_matches_paper_formula(tmp_path: Path, llama_family) -> None:
    base, x, y = llama_family["base"], llama_family["chat"], llama_family["med"]
    merge(f"""
models:
  - model: {base}
  - model: {x}
    parameters: {{density: 0.5, weight: 0.7}}
  - model: {y}
    parameters: {{density: 0.5, weight: 0.3}}
merge_method: ties
base_model: {base}
parameters: {{normalize: true}}
dtype: float32
""", tmp_path / "out")
    W = {p: load_weights(p) for p in (base, x, y)}
    out = load_weights(tmp_path / "out")
    name = "model.layers.2.mlp.down_proj.weight"
    b0 = W[base][name].double()
    deltas, weights = [], torch.tensor([0.7, 0.3], dtype=torch.float64)
    ambiguous = torch.zeros_like(b0, dtype=torch.bool)
    for p in (x, y):
        d = W[p][name].double() - b0
        k = int(0.5 * d.numel())
        threshold = d.abs().flatten().sort(descending=True).values[k - 1]
        deltas.append(d * (d.abs() >= threshold))
        ambiguous |= d.abs() == threshold  # fp16 inputs tie at the cut: either choice is the formula
    D = torch.stack(deltas) * weights[:, None, None]
    sign = torch.where(D.sum(0) >= 0, 1.0, -1.0).double()
    agree = (D.sign() == sign)
    num = (D * agree).sum(0)
    den = (weights[:, None, None] * agree).sum(0)
    den[den == 0] = 1
    expected = b0 + num / den
    assert ambiguous.float().mean() < 0.01
    torch.testing.assert_close(out[name].double()[~ambiguous], expected[~ambiguous], rtol=0, atol=1e-5)


def test_passthrough_frankenmerge_renumbers_layers_and_updates_config(tmp_path: Path, llama_family) -> None:
    a, b = llama_family["base"], llama_family["code"]
    merge(f"""
slices:
  - sources: [{{model: {a}, layer_range: [0, 3]}}]
  - sources: [{{model: {b}, layer_range: [1, 4]}}]
merge_method: passthrough
dtype: float16
""", tmp_path / "out")
    A, B, out = load_weights(a), load_weights(b), load_weights(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    for i in range(6):
        src, j = (A, i) if i < 3 else (B, i - 2)
        for suffix in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"):
            assert torch.equal(out[f"model.layers.{i}.{suffix}"], src[f"model.layers.{j}.{suffix}"])
    assert torch.equal(out["model.embed_tokens.weight"], A["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], B["lm_head.weight"])


def test_layer_range_out_of_bounds_is_refused(tmp_path: Path, llama_family) -> None:
    with pytest.raises(RecipeError, match=r"layer_range \[2, 9\] .* out of bounds: it has 4 layers"):
        merge(f"slices:\n  - sources: [{{model: {llama_family['base']}, layer_range: [2, 9]}}]\n"
              "merge_method: passthrough\n", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tied_embeddings_stay_tied_and_load_in_transformers(tmp_path: Path, qwen_family) -> None:
    import transformers

    merge(f"""
models:
  - model: {qwen_family['base']}
  - model: {qwen_family['a']}
    parameters: {{weight: 0.5}}
  - model: {qwen_family['b']}
    parameters: {{weight: 0.5}}
merge_method: task_arithmetic
base_model: {qwen_family['base']}
""", tmp_path / "out")
    out = load_weights(tmp_path / "out")
    assert "lm_head.weight" not in out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok("The keeper climbed the stairs", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == config["vocab_size"]


def test_vocab_mismatch_keeps_common_rows_with_a_warning(tmp_path: Path, models_dir: Path, llama_family) -> None:
    padded = make_tiny_model(models_dir / "llama-padded", "llama", seed=1, vocab=make_vocab(llama_family) + 8)
    result = merge(f"""
models:
  - model: {llama_family['base']}
    parameters: {{weight: 0.5}}
  - model: {padded}
    parameters: {{weight: 0.5}}
merge_method: linear
""", tmp_path / "out")
    out = load_weights(tmp_path / "out")
    rows = make_vocab(llama_family)
    assert out["model.embed_tokens.weight"].shape[0] == rows
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == rows
    assert any("vocab sizes differ" in w for w in result.warnings)


def test_tokenizer_source_base_keeps_the_base_vocabulary(tmp_path: Path, models_dir: Path, llama_family) -> None:
    rows = make_vocab(llama_family)
    padded = make_tiny_model(models_dir / "llama-padded2", "llama", seed=3, vocab=rows + 8)
    merge(f"""
models:
  - model: {padded}
  - model: {llama_family['base']}
    parameters: {{weight: 1.0}}
merge_method: task_arithmetic
base_model: {padded}
tokenizer_source: base
dtype: float32
""", tmp_path / "out")
    out = load_weights(tmp_path / "out")
    P, B = load_weights(padded), load_weights(llama_family["base"])
    emb = out["model.embed_tokens.weight"]
    # one row per token of the base's tokenizer, as mergekit 0.1.5 writes it: the base's 8 padding rows
    # have no token and are dropped; real tokens: base + (model - base)
    assert emb.shape[0] == rows and P["model.embed_tokens.weight"].shape[0] == rows + 8
    torch.testing.assert_close(emb, B["model.embed_tokens.weight"][:rows].float(), rtol=0, atol=1e-6)


def make_vocab(family: dict[str, Path]) -> int:
    return json.loads((family["base"] / "config.json").read_text())["vocab_size"]


def test_sharded_output_bf16_and_layout(tmp_path: Path, llama_family) -> None:
    text = f"""models:
  - model: {llama_family['base']}
    parameters: {{weight: 0.5}}
  - model: {llama_family['chat']}
    parameters: {{weight: 0.5}}
merge_method: linear
dtype: bfloat16
"""
    merge(text, tmp_path / "out", shard_size=40_000)
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "model-00001-of-" in " ".join(files)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "mergekit_config.yml"):
        assert name in files
    assert (out / "mergekit_config.yml").read_text() == text
    assert all(t.dtype == torch.bfloat16 for t in load_weights(out).values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not list(tmp_path.glob(".out.partial-*"))


def test_dare_is_reproducible_from_the_seed(tmp_path: Path, llama_family) -> None:
    text = f"""models:
  - model: {llama_family['base']}
  - model: {llama_family['chat']}
    parameters: {{density: 0.5, weight: 1.0}}
merge_method: dare_linear
base_model: {llama_family['base']}
dtype: float32
"""
    merge(text, tmp_path / "s1", seed=7)
    merge(text, tmp_path / "s2", seed=7)
    merge(text, tmp_path / "s3", seed=8)
    one, two, three = (load_weights(tmp_path / s) for s in ("s1", "s2", "s3"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert all(torch.equal(one[n], two[n]) for n in one)
    assert not torch.equal(one[name], three[name])
    base, chat = load_weights(llama_family["base"])[name].float(), load_weights(llama_family["chat"])[name].float()
    delta, merged_delta = chat - base, one[name] - base
    kept = merged_delta.abs() > 1e-7
    assert 0.45 < kept.float().mean().item() < 0.55
    # mergekit 0.1.5 rescales the kept entries so the delta keeps its L1 norm (about 1/density)
    scale = delta.abs().sum() / delta[kept].abs().sum()
    assert 1.8 < scale < 2.2
    torch.testing.assert_close(merged_delta[kept], scale * delta[kept], rtol=1e-3, atol=1e-5)
    assert tensor_seed(7, name) == tensor_seed(7, name) != tensor_seed(7, name + "x")


def test_cancel_leaves_nothing(tmp_path: Path, llama_family) -> None:
    cancel = threading.Event()
    seen = []

    def progress(event) -> None:
        seen.append(event)
        if len(seen) == 5:
            cancel.set()

    with pytest.raises(CancelledError):
        merge(f"models:\n  - model: {llama_family['base']}\n  - model: {llama_family['chat']}\n"
              f"merge_method: slerp\nbase_model: {llama_family['base']}\nparameters: {{t: 0.3}}\n",
              tmp_path / "out", progress=progress, cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_stale_partial_output_of_a_killed_run_is_removed(tmp_path: Path, llama_family) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.partial-{dead.stdout.strip()}-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    merge(f"models:\n  - model: {llama_family['base']}\n    parameters: {{weight: 1}}\nmerge_method: linear\n",
          tmp_path / "out")
    assert not stale.exists() and (tmp_path / "out" / "model.safetensors").exists()


def test_existing_output_is_not_clobbered(tmp_path: Path, llama_family) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    text = f"models:\n  - model: {llama_family['base']}\n    parameters: {{weight: 1}}\nmerge_method: linear\n"
    with pytest.raises(ModelError, match="already exists"):
        merge(text, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    merge(text, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_cli_run_and_one_line_errors(tmp_path: Path, llama_family) -> None:
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"models:\n  - model: {llama_family['base']}\n  - model: {llama_family['chat']}\n"
                      f"merge_method: slerp\nbase_model: {llama_family['base']}\nparameters: {{t: 0.5}}\n")
    cmd = [sys.executable, "-m", "merger", "run", str(recipe), str(tmp_path / "out"), "--device", "cpu"]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "merged" in ok.stdout and (tmp_path / "out" / "model.safetensors").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr
    recipe.write_text("merge_method: dare-ties\nmodels: [{model: a/b}]\n")
    bad = subprocess.run(cmd[:5] + [str(tmp_path / "x")], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "did you mean 'dare_ties'" in bad.stderr
    assert "Traceback" not in bad.stderr and bad.stderr.strip().count("\n") == 0
    # a check failure stops before anything is written: one error line after the progress lines
    recipe.write_text(f"models:\n  - model: {llama_family['base']}\n  - model: {tmp_path}\n"
                      f"merge_method: slerp\nbase_model: {llama_family['base']}\nparameters: {{t: 0.5}}\n")
    (tmp_path / "config.json").write_text("{}")
    failed = subprocess.run(cmd[:5] + ["new"], capture_output=True, text=True, cwd=REPO)
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and lines[-1].startswith("error: pre-flight check failed")
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in failed.stderr
    assert not (tmp_path / "new").exists()


def test_fp16_bf16_fp32_inputs_mix_freely(tmp_path: Path, models_dir: Path, llama_family) -> None:
    base = llama_family["base"]
    bf16 = make_tiny_model(models_dir / "llama-bf16", perturb_from=base, seed=31, perturb_scale=0.05,
                           dtype=torch.bfloat16)
    fp32 = make_tiny_model(models_dir / "llama-fp32", perturb_from=base, seed=32, perturb_scale=0.05,
                           dtype=torch.float32)
    merge(f"""models:
  - model: {base}
    parameters: {{weight: 0.2}}
  - model: {bf16}
    parameters: {{weight: 0.3}}
  - model: {fp32}
    parameters: {{weight: 0.5}}
merge_method: linear
""", tmp_path / "out")
    W = [load_weights(p) for p in (base, bf16, fp32)]
    assert {W[1][n].dtype for n in W[1]} == {torch.bfloat16} and {W[2][n].dtype for n in W[2]} == {torch.float32}
    out = load_weights(tmp_path / "out")
    for name, got in out.items():
        assert got.dtype == torch.float16  # the first model's dtype, as no dtype was given
        expected = (0.2 * W[0][name].double() + 0.3 * W[1][name].double() + 0.5 * W[2][name].double())
        torch.testing.assert_close(got.double(), expected.half().double(), rtol=1e-3, atol=1e-4)


def test_pickle_bin_checkpoints_need_allow_bin(tmp_path: Path, llama_family) -> None:
    bin_model = tmp_path / "bin-model"
    bin_model.mkdir()
    for f in llama_family["chat"].iterdir():
        if f.suffix != ".safetensors":
            (bin_model / f.name).write_bytes(f.read_bytes())
    torch.save(load_weights(llama_family["chat"]), bin_model / "pytorch_model.bin")
    text = f"""models:
  - model: {llama_family['base']}
    parameters: {{weight: 0.5}}
  - model: CHAT
    parameters: {{weight: 0.5}}
merge_method: linear
"""
    with pytest.raises(ModelError, match="pass --allow-bin"):
        merge(text.replace("CHAT", str(bin_model)), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    merge(text.replace("CHAT", str(bin_model)), tmp_path / "from-bin", allow_bin=True)
    merge(text.replace("CHAT", str(llama_family["chat"])), tmp_path / "from-safetensors")
    a, b = load_weights(tmp_path / "from-bin"), load_weights(tmp_path / "from-safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_chat_template_name_is_written_into_the_tokenizer_config(tmp_path: Path, llama_family) -> None:
    from merger.output import CHAT_TEMPLATES

    merge(f"models:\n  - model: {llama_family['base']}\n    parameters: {{weight: 1}}\n"
          "merge_method: linear\nchat_template: chatml\n", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATES["chatml"] and "<|im_start|>" in config["chat_template"]
