"""Tiny model generator: real transformers classes load the folders, bytes are reproducible."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from merger.errors import ModelError
from merger.app.tiny import FAMILIES, TRAINING_TEXT, make_tiny_model

import tokenizers  # noqa: E402  (test requirements: missing is an error, never a skip)
import transformers  # noqa: E402

TEXT = "The keeper counted 112 steps; the wind was from the west!"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys()})
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {fam: make_tiny_model(root / fam, fam, num_layers=2) for fam in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_loads_every_tensor(models: dict[str, Path], family: str) -> None:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        models[family], output_loading_info=True, dtype=torch.float32
    )
    assert {k: v for k, v in info.items() if v} == {}
    assert type(model).__name__ == FAMILIES[family].architecture
    tok = transformers.AutoTokenizer.from_pretrained(models[family])
    ids = tok(TEXT, return_tensors="pt").input_ids
    logits = model(ids).logits
    config = json.loads((models[family] / "config.json").read_text())
    assert logits.shape == (1, ids.shape[1], config["vocab_size"])
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1  # not a degenerate model: logits vary over the vocabulary
    assert config["vocab_size"] == len(tok) == model.get_input_embeddings().weight.shape[0]
    assert model.config.tie_word_embeddings == FAMILIES[family].tied
    if FAMILIES[family].tied:
        assert "lm_head.weight" not in _tensors(models[family])


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "phi"])
def test_tokenizer_is_real_byte_level_bpe(models: dict[str, Path], family: str) -> None:
    fast = tokenizers.Tokenizer.from_file(str(models[family] / "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(models[family])
    enc = fast.encode(TEXT, add_special_tokens=False)
    assert hf(TEXT, add_special_tokens=False).input_ids == enc.ids
    assert fast.decode(enc.ids) == TEXT
    assert len(enc.ids) < len(TEXT.encode()) * 0.6  # the merges compress English text
    train = fast.encode(TRAINING_TEXT, add_special_tokens=False).ids
    assert len(train) < len(TRAINING_TEXT) / 2
    spec = FAMILIES[family].tokens
    with_special = hf(TEXT).input_ids
    if spec.add_bos:
        assert with_special == [hf.convert_tokens_to_ids(spec.bos)] + enc.ids
    else:
        assert with_special == enc.ids
    prompt = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "hi" in prompt


def test_same_arguments_give_identical_bytes(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", "qwen2", seed=3, num_layers=2, shards=2)
    b = make_tiny_model(tmp_path / "b", "qwen2", seed=3, num_layers=2, shards=2)
    c = make_tiny_model(tmp_path / "c", "qwen2", seed=4, num_layers=2, shards=2)
    assert _digest(a) == _digest(b)
    da, dc = _digest(a), _digest(c)
    assert da["tokenizer.json"] == dc["tokenizer.json"]
    assert da["model-00001-of-00002.safetensors"] != dc["model-00001-of-00002.safetensors"]


def test_perturbed_fine_tunes_are_small_seeded_deltas(tmp_path: Path) -> None:
    parent = make_tiny_model(tmp_path / "base", "llama", num_layers=2, dtype=torch.float32)
    ft1 = make_tiny_model(tmp_path / "ft1", perturb_from=parent, seed=1, perturb_scale=0.01)
    ft2 = make_tiny_model(tmp_path / "ft2", perturb_from=parent, seed=2, perturb_scale=0.01)
    base, t1, t2 = _tensors(parent), _tensors(ft1), _tensors(ft2)
    assert base.keys() == t1.keys() == t2.keys()
    for name, w in base.items():
        rel = ((t1[name] - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()
        if w.numel() >= 64:
            assert 0.007 < rel < 0.013, name  # perturb_scale = 0.01 of the tensor's RMS
        assert not torch.equal(t1[name], t2[name])
    assert (ft1 / "tokenizer.json").read_bytes() == (parent / "tokenizer.json").read_bytes()
    assert (ft1 / "config.json").read_bytes() == (parent / "config.json").read_bytes()


def test_sharded_folder_loads_and_matches_single_file(tmp_path: Path) -> None:
    single = make_tiny_model(tmp_path / "one", "mistral", num_layers=2)
    sharded = make_tiny_model(tmp_path / "three", "mistral", num_layers=2, shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _tensors(single).values())
    a = _tensors(single)
    b = _tensors(sharded)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    model = transformers.AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32)
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()


def test_header_only_files_describe_the_full_model(tmp_path: Path) -> None:
    full = make_tiny_model(tmp_path / "full", "phi3", num_layers=2)
    bare = make_tiny_model(tmp_path / "bare", "phi3", num_layers=2, header_only=True)
    raw_full = (full / "model.safetensors").read_bytes()
    raw_bare = (bare / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw_bare[:8])
    assert len(raw_bare) == 8 + n
    assert raw_full[: 8 + n] == raw_bare
    header = json.loads(raw_bare[8:])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert len(raw_full) == 8 + n + end


def test_vocab_padding_adds_embedding_rows(tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path / "pad", "llama", num_layers=1, vocab=512)
    tensors = _tensors(folder)
    assert tensors["model.embed_tokens.weight"].shape == (512, 64)
    assert tensors["lm_head.weight"].shape == (512, 64)
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 512
    assert len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]) < 512


def test_legacy_phi_is_the_same_model_in_the_old_layout(tmp_path: Path) -> None:
    new = _tensors(make_tiny_model(tmp_path / "new", "phi", num_layers=2))
    folder = make_tiny_model(tmp_path / "old", "phi", num_layers=2, layout="legacy")
    old = _tensors(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "phi-msft" and config["architectures"] == ["PhiForCausalLM"]
    assert (config["n_embd"], config["n_layer"], config["n_head"], config["n_inner"], config["rotary_dim"]) == (
        64, 2, 4, 128, 8,
    )
    assert "auto_map" in config
    assert len(old) == len(new) - 2 * 2 * 2  # q,k,v weight+bias fused into Wqkv weight+bias per layer
    wqkv = old["transformer.h.1.mixer.Wqkv.weight"]
    assert torch.equal(wqkv[:64], new["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(wqkv[64:128], new["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(wqkv[128:], new["model.layers.1.self_attn.v_proj.weight"])
    assert torch.equal(old["transformer.h.0.mixer.out_proj.bias"], new["model.layers.0.self_attn.dense.bias"])
    assert torch.equal(old["transformer.h.0.ln.weight"], new["model.layers.0.input_layernorm.weight"])
    assert torch.equal(old["lm_head.ln.bias"], new["model.final_layernorm.bias"])
    assert torch.equal(old["lm_head.linear.weight"], new["lm_head.weight"])
    assert torch.equal(old["transformer.embd.wte.weight"], new["model.embed_tokens.weight"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"family": "gpt5"}, "unknown tiny model family"),
        ({"family": "llama", "layout": "legacy"}, "only phi"),
        ({"family": "llama", "vocab": 10}, "smaller than the tokenizer"),
        ({"family": "phi", "tie_word_embeddings": True}, "cannot tie"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message) as err:
        make_tiny_model(tmp_path / "x", **kwargs)
    assert "\n" not in str(err.value)
