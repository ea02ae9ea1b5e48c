"""SentencePiece tokenizers (tokenizer.model, as llama/mistral/gemma repos ship): generated, converted, parity."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from merger.errors import ModelError
from merger.app.tiny import make_tiny_model, make_tokenizer_files
from quantize.convert import _adds_dummy_prefix, convert_folder

import llama_cpp  # noqa: E402  (test requirements: missing is an error, never a skip)
import sentencepiece  # noqa: E402,F401
import transformers  # noqa: E402

# Shared with the BPE tests: logits helpers (the converter fixture is in conftest.py).
from test_quantize import (  # noqa: E402
    _DRIVER, IDS, TEXTS, _gguf_logits, _rel, _transformers_logits,
)

FAMILIES = ["llama", "gemma"]
ALL_FAMILIES = ["llama", "mistral", "gemma", "gemma2"]  # every family with a SentencePiece option
SPM_TEXTS = [*TEXTS, " ", "x", "The lighthouse keeper's notebook: 12 boats, 3 storms."]
# Chat text, tokenized with special-token parsing on (HF always treats added tokens as atomic).
_LLAMA_CHAT = "<s>[INST] Who keeps the light? [/INST] The keeper.</s>"
_GEMMA_CHAT = "<bos><start_of_turn>user\nWho keeps the light?<end_of_turn>\n<start_of_turn>model\n"
CHAT = {"llama": _LLAMA_CHAT, "mistral": _LLAMA_CHAT, "gemma": _GEMMA_CHAT, "gemma2": _GEMMA_CHAT}


@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spm_models")
    return {
        fam: make_tiny_model(root / fam, fam, num_layers=2, dtype=torch.float32, tokenizer="sentencepiece")
        for fam in ALL_FAMILIES
    }


def _processor(folder: Path):  # noqa: ANN202 - sentencepiece.SentencePieceProcessor
    return sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def test_files_are_reproducible_and_match_the_model(spm: dict[str, Path], tmp_path: Path) -> None:
    for fam in FAMILIES:
        again = make_tiny_model(tmp_path / fam, fam, num_layers=2, dtype=torch.float32, tokenizer="sentencepiece")
        digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(spm[fam].iterdir())}
        assert digest == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(again.iterdir())}
        sp = _processor(spm[fam])
        config = json.loads((spm[fam] / "config.json").read_text())
        model = transformers.AutoModelForCausalLM.from_pretrained(spm[fam])
        assert config["vocab_size"] == sp.GetPieceSize() == model.get_input_embeddings().weight.shape[0] == 384
        assert sum(sp.IsByte(i) for i in range(sp.GetPieceSize())) == 256  # byte fallback, like llama
    llama, gemma = _processor(spm["llama"]), _processor(spm["gemma"])
    assert [llama.IdToPiece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (llama.unk_id(), llama.bos_id(), llama.eos_id(), llama.pad_id()) == (0, 1, 2, -1)
    gemma_specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    assert [gemma.IdToPiece(i) for i in range(6)] == gemma_specials
    assert (gemma.pad_id(), gemma.eos_id(), gemma.bos_id(), gemma.unk_id()) == (0, 1, 2, 3)
    # gemma's turn markers are user-defined pieces: matched whole in text, unlike control tokens
    assert gemma.encode("<end_of_turn>") == [5] and llama.encode("</s>") != [2]
    # llama puts "▁" before the text (add_dummy_prefix), gemma does not
    assert llama.encode("x", out_type=str)[0].startswith("\u2581")
    assert not gemma.encode("x", out_type=str)[0].startswith("\u2581")


def test_dummy_prefix_is_read_like_protobuf_reads_it(spm: dict[str, Path]) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb2

    for fam, expected in (("llama", True), ("gemma", False)):
        raw = (spm[fam] / "tokenizer.model").read_bytes()
        proto = pb2.ModelProto()
        proto.ParseFromString(raw)
        assert proto.normalizer_spec.add_dummy_prefix is expected
        assert _adds_dummy_prefix(raw) is expected


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_tokenizer_equals_sentencepiece(spm: dict[str, Path], family: str) -> None:
    sp = _processor(spm[family])
    hf = transformers.AutoTokenizer.from_pretrained(spm[family])
    for text in SPM_TEXTS:
        ids = hf(text, add_special_tokens=False).input_ids
        assert ids == sp.encode(text), text
        assert hf(text).input_ids == [sp.bos_id(), *ids]
        assert hf.decode(ids) == sp.decode(ids) == text
    assert max(sp.encode(SPM_TEXTS[-1])) > 256 + 6  # merges were used, not only bytes and characters


def test_unsupported_requests_are_one_line_model_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelError, match="llama, mistral, gemma, gemma2"):
        make_tokenizer_files(tmp_path / "q", "qwen2", "sentencepiece")
    with pytest.raises(ModelError, match="choose one of bpe, sentencepiece"):
        make_tokenizer_files(tmp_path / "q", "llama", "wordpiece")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if not installed
    with pytest.raises(ModelError, match="pip install sentencepiece") as err:
        make_tiny_model(tmp_path / "l", "llama", num_layers=1, tokenizer="sentencepiece")
    assert "\n" not in str(err.value)
    make_tiny_model(tmp_path / "b", "llama", num_layers=1)  # the BPE tokenizer does not need it


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_f32_logits_in_llama_cpp_match_transformers(spm: dict[str, Path], tmp_path: Path, family: str) -> None:
    (path,) = convert_folder(spm[family], tmp_path / f"{family}.gguf", "f32")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.model"].contents() == "llama"
    ref = _transformers_logits(spm[family], family, emulate_gelu_table=True)
    assert _rel(_gguf_logits(path, IDS), ref) < 1e-4


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_llama_cpp_tokenizes_like_sentencepiece(spm: dict[str, Path], tmp_path: Path, family: str) -> None:
    (path,) = convert_folder(spm[family], tmp_path / "t.gguf", "f32")
    sp = _processor(spm[family])
    hf = transformers.AutoTokenizer.from_pretrained(spm[family])
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        for text in SPM_TEXTS:
            ids = sp.encode(text)
            assert llm.tokenize(text.encode(), add_bos=False) == ids, text
            assert llm.tokenize(text.encode(), add_bos=True) == [sp.bos_id(), *ids]
            # llama-cpp-python joins the pieces as they are: llama's dummy-prefix space stays
            assert llm.detokenize(ids).decode() == (" " if family in ("llama", "mistral") else "") + text
        chat = CHAT[family]
        assert llm.tokenize(chat.encode(), add_bos=False, special=True) == hf(chat, add_special_tokens=False).input_ids
    finally:
        llm.close()


# llama.cpp's Gemma converter sets CodeGemma's end-of-turn id (107) on every Gemma ("TODO" in its
# source); here 107 is an ordinary piece, and llama.cpp finds <end_of_turn> by its text anyway.
_CODEGEMMA_EOT = "tokenizer.ggml.eot_token_id"


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_gguf_equals_llama_cpp_converter_output(
    spm: dict[str, Path], tmp_path: Path, llama_cpp_converter: Path, family: str
) -> None:
    theirs = tmp_path / "theirs.gguf"
    ran = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(llama_cpp_converter), str(spm[family]), "--outtype", "f32",
         "--outfile", str(theirs)], capture_output=True, text=True, timeout=600,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    (ours,) = convert_folder(spm[family], tmp_path / "ours.gguf", "f32")
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    mine = {k: f.contents() for k, f in a.fields.items() if not k.startswith(("GGUF.", "general.name"))}
    ref = {k: f.contents() for k, f in b.fields.items() if not k.startswith(("GGUF.", "general.name"))}
    if family == "gemma":
        assert ref.pop(_CODEGEMMA_EOT) == 107
        assert ref["tokenizer.ggml.add_space_prefix"] is False
    for key in ("tokens", "scores", "token_type", "bos_token_id", "eos_token_id", "unknown_token_id", "add_bos_token"):
        assert f"tokenizer.ggml.{key}" in ref, key
    assert {k: mine.get(k) for k in ref} == ref
    arch = ref["general.architecture"]
    assert all(k.removeprefix(arch + ".") in ("rope.freq_base", "rope.dimension_count", "vocab_size")
               for k in set(mine) - set(ref))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ta.keys() == tb.keys()
    for name, t in tb.items():
        assert ta[name].tensor_type == t.tensor_type and list(ta[name].shape) == list(t.shape), name
        np.testing.assert_array_equal(np.asarray(ta[name].data), np.asarray(t.data), err_msg=name)


_WITHOUT_TEST_EXTRAS = '''
import sys
for name in ("transformers", "tokenizers", "google", "google.protobuf", "mergekit"):
    sys.modules[name] = None  # not in requirements.txt: importing them must fail
from merger.app.tiny import make_tiny_model
from quantize.convert import convert_folder
for family in ("llama", "gemma"):
    folder = make_tiny_model(sys.argv[1] + "/" + family, family, num_layers=1, tokenizer="sentencepiece")
    convert_folder(folder, sys.argv[1] + "/" + family + ".gguf", "f16")
'''


def test_runtime_requirements_generate_and_convert_sentencepiece(tmp_path: Path) -> None:
    """requirements.txt (sentencepiece, gguf; no transformers, tokenizers or protobuf) is enough for both."""
    ran = subprocess.run([sys.executable, "-c", _WITHOUT_TEST_EXTRAS, str(tmp_path)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    fields = gguf.GGUFReader(tmp_path / "gemma.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is False
