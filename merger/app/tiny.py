"""Deterministic tiny Hugging Face model folders (weights, config, a real tokenizer).

Tests, demos and benchmarks need models that look exactly like Hub checkpoints of each supported
family (tensor names, config keys, shapes, shards, tokenizer files) but are small and reproducible
byte for byte, without a network and without transformers. Fine-tunes of a parent are the parent's
weights plus small seeded noise, so merges of them are meaningful. The tokenizer is byte-level BPE, or
for the families whose Hub repos ship `tokenizer.model` (llama, mistral, gemma), optionally a real
SentencePiece model trained in-process (needs the sentencepiece package, and only then).
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from merger.errors import ModelError

__all__ = [
    "FAMILIES",
    "TOKENIZERS",
    "TRAINING_TEXT",
    "make_tiny_model",
    "make_tokenizer_files",
    "bpe_vocab_and_merges",
    "write_safetensors",
]

# A short plain English text the byte-level BPE merges are learned from (original text).
TRAINING_TEXT = """\
The old lighthouse keeper climbed the stairs every evening before the sun went down. He carried a
small lamp, a notebook and a thermos of tea, and he counted the steps as he went: one hundred and
twelve, always the same. At the top he cleaned the glass, checked the oil and wrote the weather in
his notebook. The wind was from the west; the sea was calm; three fishing boats were coming home.
In the village below, the children watched the light turn on. They said that the keeper could see
the whole world from up there, and in a way that was true. He could see the harbour and the hills,
the road that ran along the coast and the train that came twice a day. He knew every boat by the
shape of its sail and every storm by the colour of the sky. When the weather was bad he stayed in
the tower all night, and when the morning came he walked down the stairs, slowly, counting again.
People often asked him whether he was lonely. He always answered that a lighthouse is never lonely,
because it is there for the others: for the sailors who need to find their way, for the families
waiting on the shore, for the ships that pass in the dark and never stop. The light does not know
who is looking at it, and it does not need to know. It only needs to turn, and to shine, and to be
there again tomorrow. In the winter the days were short and the nights were long, and the keeper
read books by the window while the light turned above him. He liked stories about the sea, about
travellers and their maps, about the first people who measured the height of the waves and the
speed of the wind. He wrote letters to his sister in the city and told her about the birds, the
boats and the changing weather. She wrote back about the trains, the markets and the noise of the
streets, and each of them thought that the other had the more interesting life.
"""

_NUM_MERGES = 192
_SENTENCEPIECE_VOCAB = 384
TOKENIZERS = ("bpe", "sentencepiece")


@dataclass(frozen=True)
class _TokenizerSpec:
    """Special tokens and templates of one family's tokenizer (ids follow the list order, from 0)."""

    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None
    add_bos: bool
    chat_template: str
    sentencepiece: bool = False  # the family's Hub repos ship a SentencePiece tokenizer.model
    spm_dummy_prefix: bool = True  # SentencePiece add_dummy_prefix (llama: "▁" before the text; gemma: none)


_LLAMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_GEMMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role'])"
    " + '\\n' + m['content'] + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
_PHI_CHAT = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Instruct: ' + m['content'] + '\\n' }}"
    "{% else %}{{ 'Output: ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Output:' }}{% endif %}"
)
_PHI3_CHAT = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_LLAMA_TOKENS = _TokenizerSpec(
    ("<unk>", "<s>", "</s>"), "<s>", "</s>", None, "<unk>", True, _LLAMA_CHAT, True, True
)
_QWEN_TOKENS = _TokenizerSpec(
    ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|endoftext|>", "<|endoftext|>", None, False, _CHATML
)
_GEMMA_TOKENS = _TokenizerSpec(
    ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
    "<bos>", "<eos>", "<pad>", "<unk>", True, _GEMMA_CHAT, True, False,
)
_PHI_TOKENS = _TokenizerSpec(("<|endoftext|>",), "<|endoftext|>", "<|endoftext|>", None, "<|endoftext|>", False, _PHI_CHAT)
_PHI3_TOKENS = _TokenizerSpec(
    ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"),
    "<s>", "<|endoftext|>", "<|endoftext|>", "<unk>", False, _PHI3_CHAT,
)

# Tokenizer conventions by name, for families made here and in merger.app.tiny_hf.
TOKEN_SPECS: dict[str, _TokenizerSpec] = {
    "llama": _LLAMA_TOKENS, "qwen2": _QWEN_TOKENS, "gemma": _GEMMA_TOKENS, "phi": _PHI_TOKENS, "phi3": _PHI3_TOKENS,
    "llama3": _TokenizerSpec(("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"),
                             "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", None, True, _CHATML),
    "olmo2": _TokenizerSpec(("<|endoftext|>", "<|pad|>"), "<|endoftext|>", "<|endoftext|>", "<|pad|>", None,
                            False, _CHATML),
    "granite": _TokenizerSpec(("<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|pad|>"),
                              "<|end_of_text|>", "<|end_of_text|>", "<|pad|>", None, False, _CHATML),
    "cohere": _TokenizerSpec(("<PAD>", "<UNK>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>"),
                             "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<PAD>", "<UNK>", True, _CHATML),
    "starcoder2": _TokenizerSpec(("<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"),
                                 "<|endoftext|>", "<|endoftext|>", "<fim_pad>", "<|endoftext|>", False, _CHATML),
    "stablelm": _TokenizerSpec(("<|endoftext|>", "<|padding|>", "<|im_start|>", "<|im_end|>"), "<|endoftext|>",
                               "<|endoftext|>", "<|padding|>", None, False, _CHATML),
}

# Tensor shapes are written with symbolic dimensions, resolved per model:
#   h hidden, i intermediate, v vocab, q = heads*head_dim, kv = kv_heads*head_dim, d head_dim,
#   qkv = q + 2*kv, gu = 2*i.
# Kind "norm" is initialised around 1 (RMSNorm / LayerNorm scale), "norm0" around 0 (Gemma's 1 + w),
# "bias" and "weight" around 0.
_LLAMA_LAYER = (
    ("input_layernorm.weight", ("h",), "norm"),
    ("self_attn.q_proj.weight", ("q", "h"), "weight"),
    ("self_attn.k_proj.weight", ("kv", "h"), "weight"),
    ("self_attn.v_proj.weight", ("kv", "h"), "weight"),
    ("self_attn.o_proj.weight", ("h", "q"), "weight"),
    ("post_attention_layernorm.weight", ("h",), "norm"),
    ("mlp.gate_proj.weight", ("i", "h"), "weight"),
    ("mlp.up_proj.weight", ("i", "h"), "weight"),
    ("mlp.down_proj.weight", ("h", "i"), "weight"),
)
_QWEN2_LAYER = _LLAMA_LAYER + (
    ("self_attn.q_proj.bias", ("q",), "bias"),
    ("self_attn.k_proj.bias", ("kv",), "bias"),
    ("self_attn.v_proj.bias", ("kv",), "bias"),
)
_QWEN3_LAYER = _LLAMA_LAYER + (
    ("self_attn.q_norm.weight", ("d",), "norm"),
    ("self_attn.k_norm.weight", ("d",), "norm"),
)
_GEMMA_LAYER = tuple((n, s, "norm0" if k == "norm" else k) for n, s, k in _LLAMA_LAYER)
_GEMMA2_LAYER = _GEMMA_LAYER + (
    ("pre_feedforward_layernorm.weight", ("h",), "norm0"),
    ("post_feedforward_layernorm.weight", ("h",), "norm0"),
)
_PHI_LAYER = (
    ("input_layernorm.weight", ("h",), "norm"),
    ("input_layernorm.bias", ("h",), "bias"),
    ("self_attn.q_proj.weight", ("q", "h"), "weight"),
    ("self_attn.q_proj.bias", ("q",), "bias"),
    ("self_attn.k_proj.weight", ("kv", "h"), "weight"),
    ("self_attn.k_proj.bias", ("kv",), "bias"),
    ("self_attn.v_proj.weight", ("kv", "h"), "weight"),
    ("self_attn.v_proj.bias", ("kv",), "bias"),
    ("self_attn.dense.weight", ("h", "q"), "weight"),
    ("self_attn.dense.bias", ("h",), "bias"),
    ("mlp.fc1.weight", ("i", "h"), "weight"),
    ("mlp.fc1.bias", ("i",), "bias"),
    ("mlp.fc2.weight", ("h", "i"), "weight"),
    ("mlp.fc2.bias", ("h",), "bias"),
)
_PHI3_LAYER = (
    ("input_layernorm.weight", ("h",), "norm"),
    ("self_attn.qkv_proj.weight", ("qkv", "h"), "weight"),
    ("self_attn.o_proj.weight", ("h", "q"), "weight"),
    ("post_attention_layernorm.weight", ("h",), "norm"),
    ("mlp.gate_up_proj.weight", ("gu", "h"), "weight"),
    ("mlp.down_proj.weight", ("h", "i"), "weight"),
)


@dataclass(frozen=True)
class _Family:
    """Everything that differs between families: config keys, tensors, tokenizer conventions."""

    model_type: str
    architecture: str
    layer: tuple[tuple[str, tuple[str, ...], str], ...]
    final_norm: tuple[tuple[str, tuple[str, ...], str], ...]
    kv_heads: int  # for the default 4 attention heads
    tied: bool
    lm_head_bias: bool
    tokens: _TokenizerSpec
    config: dict  # family-specific config keys (beyond the shared ones)


_RMS_FINAL = (("model.norm.weight", ("h",), "norm"),)
_GEMMA_FINAL = (("model.norm.weight", ("h",), "norm0"),)

FAMILIES: dict[str, _Family] = {
    "llama": _Family(
        "llama", "LlamaForCausalLM", _LLAMA_LAYER, _RMS_FINAL, 2, False, False, _LLAMA_TOKENS,
        {"hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
         "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
    ),
    "mistral": _Family(
        "mistral", "MistralForCausalLM", _LLAMA_LAYER, _RMS_FINAL, 2, False, False, _LLAMA_TOKENS,
        {"hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": None},
    ),
    "qwen2": _Family(
        "qwen2", "Qwen2ForCausalLM", _QWEN2_LAYER, _RMS_FINAL, 2, True, False, _QWEN_TOKENS,
        {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": False,
         "sliding_window": 2048, "max_window_layers": 4},
    ),
    "qwen3": _Family(
        "qwen3", "Qwen3ForCausalLM", _QWEN3_LAYER, _RMS_FINAL, 2, True, False, _QWEN_TOKENS,
        {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": False,
         "sliding_window": None, "max_window_layers": 4, "attention_bias": False},
    ),
    "phi": _Family(
        "phi", "PhiForCausalLM", _PHI_LAYER,
        (("model.final_layernorm.weight", ("h",), "norm"), ("model.final_layernorm.bias", ("h",), "bias")),
        4, False, True, _PHI_TOKENS,
        {"hidden_act": "gelu_new", "layer_norm_eps": 1e-5, "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
         "qk_layernorm": False, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
    ),
    "phi3": _Family(
        "phi3", "Phi3ForCausalLM", _PHI3_LAYER, _RMS_FINAL, 4, False, False, _PHI3_TOKENS,
        {"hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
         "original_max_position_embeddings": 2048, "sliding_window": 2047, "resid_pdrop": 0.0,
         "embd_pdrop": 0.0},
    ),
    "gemma": _Family(
        "gemma", "GemmaForCausalLM", _GEMMA_LAYER, _GEMMA_FINAL, 1, True, False, _GEMMA_TOKENS,
        {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
         "rope_theta": 10000.0, "attention_bias": False},
    ),
    "gemma2": _Family(
        "gemma2", "Gemma2ForCausalLM", _GEMMA2_LAYER, _GEMMA_FINAL, 2, True, False, _GEMMA_TOKENS,
        {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
         "rope_theta": 10000.0, "attention_bias": False, "attn_logit_softcapping": 50.0,
         "final_logit_softcapping": 30.0, "sliding_window": 4096, "cache_implementation": "hybrid"},
    ),
}

_NUM_HEADS = 4
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
_TORCH_DTYPES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


# ----------------------------------------------------------------------------------------- tokenizer

def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, so every byte is a visible BPE symbol."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# The GPT-2 pre-tokenizer restricted to ASCII, where it splits exactly like the \p{L}/\p{N} original.
_ASCII_GPT2_SPLIT = re.compile(r"'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def bpe_vocab_and_merges(num_merges: int = _NUM_MERGES, text: str = TRAINING_TEXT) -> tuple[list[str], list[str]]:
    """Learn byte-level BPE merges from `text`: most frequent pair first, ties broken by the pair itself.

    Returns the 256 byte symbols followed by one token per merge, and the merges as "a b" strings.
    """
    b2u = _byte_to_unicode()
    words = Counter(
        tuple(b2u[b] for b in piece.encode("utf-8")) for piece in _ASCII_GPT2_SPLIT.findall(text)
    )
    tokens = [b2u[b] for b in range(256)]
    merges: list[str] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        joined = best[0] + best[1]
        merges.append(f"{best[0]} {best[1]}")
        tokens.append(joined)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out: list[str] = []
            k = 0
            while k < len(word):
                if k + 1 < len(word) and (word[k], word[k + 1]) == best:
                    out.append(joined)
                    k += 2
                else:
                    out.append(word[k])
                    k += 1
            merged[tuple(out)] += count
        words = merged
    return tokens, merges


def _dump_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _post_processor(spec: _TokenizerSpec, bos_id: int | None) -> dict:
    """Prepend BOS when the family does (single and pair inputs), else leave the ids as they are."""
    if not spec.add_bos:
        return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    bos = {"SpecialToken": {"id": spec.bos, "type_id": 0}}
    return {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {spec.bos: {"id": spec.bos, "ids": [bos_id], "tokens": [spec.bos]}},
    }


def _write_tokenizer_configs(folder: Path, spec: _TokenizerSpec, added: list[dict], tokenizer_class: str) -> None:
    named = {"bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad, "unk_token": spec.unk}
    named = {k: v for k, v in named.items() if v is not None}
    config = {
        "add_bos_token": spec.add_bos,
        "add_eos_token": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "chat_template": spec.chat_template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "tokenizer_class": tokenizer_class,
        **named,
    }
    if spec.bos is None:
        config["bos_token"] = None
    _dump_json(folder / "tokenizer_config.json", config)
    _dump_json(folder / "special_tokens_map.json", named)


def _added_tokens(specials: tuple[str, ...]) -> list[dict]:
    return [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for i, t in enumerate(specials)
    ]


def make_tokenizer_files(folder: str | Path, family: str = "llama", tokenizer: str = "bpe") -> int:
    """Write the family's tokenizer files; return the vocab size.

    `tokenizer="bpe"`: tokenizer.json with GPT-2 style byte-level BPE (the pre-tokenizer llama.cpp calls
    "gpt-2"): the family's special tokens first (ids 0..k-1), then the 256 byte tokens, then the merges.
    `tokenizer="sentencepiece"` (llama, mistral, gemma, gemma2): a SentencePiece BPE tokenizer.model with
    byte fallback, as those Hub repos ship, plus the equivalent tokenizer.json. Both come with
    tokenizer_config.json and special_tokens_map.json.
    """
    return write_tokenizer(folder, _family(family).tokens, tokenizer, family)


def write_tokenizer(folder: str | Path, spec: _TokenizerSpec, tokenizer: str = "bpe", family: str = "llama") -> int:
    """make_tokenizer_files for a tokenizer spec (see TOKEN_SPECS); `family` names it in errors."""
    if tokenizer not in TOKENIZERS:
        raise ModelError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer == "sentencepiece":
        return _write_sentencepiece_files(folder, family, spec)
    tokens, merges = bpe_vocab_and_merges()
    vocab = {tok: i for i, tok in enumerate(spec.specials)}
    for tok in tokens:
        vocab[tok] = len(vocab)
    added = _added_tokens(spec.specials)
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": _post_processor(spec, vocab.get(spec.bos or "")),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": merges,
        },
    }
    _dump_json(folder / "tokenizer.json", tokenizer_json)
    _write_tokenizer_configs(folder, spec, added, "PreTrainedTokenizerFast")
    return len(vocab)


def _train_sentencepiece(spec: _TokenizerSpec) -> bytes:
    """A SentencePiece BPE model trained on TRAINING_TEXT with llama's settings (byte fallback, digits split,
    no normalization). BPE training keeps every sentence (no sampling, so no seed) and runs on one thread:
    the bytes are the same on every run."""
    try:
        import sentencepiece
    except ImportError:
        raise ModelError(
            "the sentencepiece tokenizer needs the sentencepiece package: pip install sentencepiece"
        ) from None
    ids = {t: i for i, t in enumerate(spec.specials)}
    named = {"unk": spec.unk, "bos": spec.bos, "eos": spec.eos, "pad": spec.pad}
    flags: dict[str, object] = {}
    for kind, piece in named.items():
        flags[f"{kind}_id"] = ids[piece] if piece else -1
        if piece:
            flags[f"{kind}_piece"] = piece
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT.splitlines()), model_writer=out, model_type="bpe",
        vocab_size=_SENTENCEPIECE_VOCAB, character_coverage=1.0, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=spec.spm_dummy_prefix,
        user_defined_symbols=[t for t in spec.specials if t not in named.values()],
        num_threads=1, minloglevel=2, **flags,
    )
    return out.getvalue()


def _sentencepiece_merges(pieces: list[str], mergeable: list[bool]) -> list[list[str]]:
    """BPE merges equivalent to SentencePiece BPE encoding: SentencePiece joins the adjacent pair whose
    concatenation is the best-scoring piece (the earliest learned), so every split of a piece into two
    pieces is a merge, ranked by the joined piece's id."""
    index = {p: i for i, p in enumerate(pieces) if mergeable[i]}
    merges = []
    for joined in (p for i, p in enumerate(pieces) if mergeable[i]):
        splits = [(joined[:k], joined[k:]) for k in range(1, len(joined))]
        splits = [s for s in splits if s[0] in index and s[1] in index]
        merges += [list(s) for s in sorted(splits, key=lambda s: (index[s[0]], index[s[1]]))]
    return merges


def _write_sentencepiece_files(folder: Path, family: str, spec: _TokenizerSpec) -> int:
    if not spec.sentencepiece:
        choices = ", ".join(f for f, fam in FAMILIES.items() if fam.tokens.sentencepiece)
        raise ModelError(f"{family} Hub repos ship no SentencePiece tokenizer.model here; choose one of {choices}")
    model = _train_sentencepiece(spec)
    (folder / "tokenizer.model").write_bytes(model)
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    pieces = [sp.IdToPiece(i) for i in range(sp.GetPieceSize())]
    if tuple(pieces[: len(spec.specials)]) != spec.specials:
        raise ModelError(f"SentencePiece put the special tokens at {pieces[: len(spec.specials)]}, not {spec.specials}")
    special = set(spec.specials)
    mergeable = [
        not (p in special or sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i) or sp.IsUnused(i))
        for i, p in enumerate(pieces)
    ]
    spaces = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if spec.spm_dummy_prefix:
        normalizer = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, spaces]}
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    else:
        normalizer = spaces
    added = _added_tokens(spec.specials)
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": None,
        "post_processor": _post_processor(spec, spec.specials.index(spec.bos) if spec.bos else None),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": spec.unk, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": {p: i for i, p in enumerate(pieces)}, "merges": _sentencepiece_merges(pieces, mergeable),
        },
    }
    _dump_json(folder / "tokenizer.json", tokenizer_json)
    # Not LlamaTokenizer/GemmaTokenizer: transformers 5 rebuilds those from its own defaults, whose Metaspace
    # drops SentencePiece's dummy prefix before leading spaces; the generic class keeps tokenizer.json as is.
    _write_tokenizer_configs(folder, spec, added, "PreTrainedTokenizerFast")
    return len(pieces)


def _special_ids(family: str) -> dict[str, int | None]:
    return special_ids(_family(family).tokens)


def special_ids(spec: _TokenizerSpec) -> dict[str, int | None]:
    """config.json's bos/eos/pad token ids for a tokenizer spec."""
    index = {t: i for i, t in enumerate(spec.specials)}
    return {
        "bos_token_id": index.get(spec.bos) if spec.bos else None,
        "eos_token_id": index[spec.eos],
        "pad_token_id": index.get(spec.pad) if spec.pad else None,
    }


# ------------------------------------------------------------------------------------- safetensors

def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], *, header_only: bool = False) -> int:
    """Write a safetensors file with tensors in name order; return the tensor data size in bytes.

    Written by hand (not safetensors.torch.save_file) so that `header_only` can produce a file whose
    header describes every tensor while holding none of the bytes, as a pre-flight check sees it.
    """
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        if not header_only:
            for name in sorted(tensors):
                f.write(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return offset


def _write_weights(folder: Path, tensors: dict[str, torch.Tensor], shards: int, header_only: bool) -> None:
    """Split tensors (in name order) into `shards` files of similar tensor counts, with an index when sharded."""
    names = sorted(tensors)
    if shards < 1 or shards > len(names):
        raise ModelError(f"shards must be between 1 and the number of tensors ({len(names)}), got {shards}")
    if shards == 1:
        write_safetensors(folder / "model.safetensors", tensors, header_only=header_only)
        return
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    groups = [names[g * len(names) // shards:(g + 1) * len(names) // shards] for g in range(shards)]
    weight_map: dict[str, str] = {}
    for g, group in enumerate(groups, start=1):
        file = f"model-{g:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / file, {n: tensors[n] for n in group}, header_only=header_only)
        weight_map.update({n: file for n in group})
    _dump_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


# ------------------------------------------------------------------------------------------ weights

def _family(name: str) -> _Family:
    if name not in FAMILIES:
        from merger.app.tiny_hf import HF_FAMILIES

        raise ModelError(f"unknown tiny model family {name!r}; choose one of {', '.join([*FAMILIES, *HF_FAMILIES])}")
    return FAMILIES[name]


def _generator(seed: int, salt: str) -> torch.Generator:
    """A generator per (seed, tensor name), so each tensor is independent of the order of creation."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(salt.encode("utf-8")))


def init_tensor(name: str, shape: tuple[int, ...], kind: str, seed: int) -> torch.Tensor:
    """Scaled random values: unit-variance activations at any width, norms near their identity."""
    noise = torch.randn(shape, generator=_generator(seed, name), dtype=torch.float32)
    if kind == "weight":
        return noise / math.sqrt(shape[-1])
    if kind == "embedding":
        return noise * (4 / math.sqrt(shape[-1]))
    if kind == "norm":
        return 1.0 + 0.1 * noise
    return 0.1 * noise


def _dims(num_layers: int, hidden: int, vocab: int, kv_heads: int) -> dict[str, int]:
    if hidden % (2 * _NUM_HEADS):
        raise ModelError(f"hidden must be a multiple of {2 * _NUM_HEADS} (4 heads of even size), got {hidden}")
    d = hidden // _NUM_HEADS
    return {"h": hidden, "i": 2 * hidden, "v": vocab, "d": d, "q": _NUM_HEADS * d, "kv": kv_heads * d,
            "qkv": (_NUM_HEADS + 2 * kv_heads) * d, "gu": 4 * hidden, "layers": num_layers}


def _tensor_specs(fam: _Family, dims: dict[str, int], tied: bool) -> list[tuple[str, tuple[int, ...], str]]:
    specs: list[tuple[str, tuple[str, ...], str]] = [("model.embed_tokens.weight", ("v", "h"), "embedding")]
    for layer in range(dims["layers"]):
        specs += [(f"model.layers.{layer}.{n}", s, k) for n, s, k in fam.layer]
    specs += list(fam.final_norm)
    if not tied:
        specs.append(("lm_head.weight", ("v", "h"), "weight"))
        if fam.lm_head_bias:
            specs.append(("lm_head.bias", ("v",), "bias"))
    return [(n, tuple(dims[x] for x in s), k) for n, s, k in specs]


def _config(fam: _Family, dims: dict[str, int], tied: bool, dtype: torch.dtype, family: str) -> dict:
    config = {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        "vocab_size": dims["v"],
        "hidden_size": dims["h"],
        "intermediate_size": dims["i"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": _NUM_HEADS,
        "num_key_value_heads": dims["kv"] // dims["d"],
        "head_dim": dims["d"],
        "max_position_embeddings": 2048,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "tie_word_embeddings": tied,
        "torch_dtype": _DTYPE_NAMES[dtype],
        **_special_ids(family),
        **fam.config,
    }
    if fam.model_type == "gemma2":
        config["query_pre_attn_scalar"] = dims["d"]
    if fam.model_type == "phi":
        del config["head_dim"]
    return config


def _legacy_phi(config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """The same Phi-2 model in the old phi-msft layout (fused Wqkv rows q|k|v, transformer.* names)."""
    heads = config["num_attention_heads"]
    legacy_config = {
        "_name_or_path": "microsoft/phi-2",
        "activation_function": config["hidden_act"],
        "architectures": ["PhiForCausalLM"],
        "attn_pdrop": 0.0,
        "auto_map": {"AutoConfig": "configuration_phi.PhiConfig", "AutoModelForCausalLM": "modeling_phi.PhiForCausalLM"},
        "embd_pdrop": 0.0,
        "flash_attn": False,
        "flash_rotary": False,
        "fused_dense": False,
        "img_processing": None,
        "initializer_range": config["initializer_range"],
        "layer_norm_epsilon": config["layer_norm_eps"],
        "model_type": "phi-msft",
        "n_embd": config["hidden_size"],
        "n_head": heads,
        "n_head_kv": None,
        "n_inner": config["intermediate_size"],
        "n_layer": config["num_hidden_layers"],
        "n_positions": config["max_position_embeddings"],
        "resid_pdrop": 0.0,
        "rotary_dim": int(config["partial_rotary_factor"] * config["hidden_size"] // heads),
        "tie_word_embeddings": False,
        "torch_dtype": config["torch_dtype"],
        "vocab_size": config["vocab_size"],
    }
    out = {
        "transformer.embd.wte.weight": tensors["model.embed_tokens.weight"],
        "lm_head.ln.weight": tensors["model.final_layernorm.weight"],
        "lm_head.ln.bias": tensors["model.final_layernorm.bias"],
        "lm_head.linear.weight": tensors["lm_head.weight"],
        "lm_head.linear.bias": tensors["lm_head.bias"],
    }
    renames = {"input_layernorm": "ln", "self_attn.dense": "mixer.out_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for layer in range(config["num_hidden_layers"]):
        new, old = f"model.layers.{layer}.", f"transformer.h.{layer}."
        for src, dst in renames.items():
            for part in ("weight", "bias"):
                out[f"{old}{dst}.{part}"] = tensors[f"{new}{src}.{part}"]
        for part in ("weight", "bias"):
            out[f"{old}mixer.Wqkv.{part}"] = torch.cat(
                [tensors[f"{new}self_attn.{p}_proj.{part}"] for p in "qkv"], dim=0
            )
    return legacy_config, out


def _read_parent(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not (folder / file).exists():
            raise ModelError(f"{folder} has no {file}; perturb_from needs a model folder with safetensors weights")
        with safe_open(folder / file, framework="pt") as f:
            for name in f.keys():
                try:
                    tensors[name] = f.get_tensor(name)
                except Exception as exc:  # a header-only file has no bytes to perturb
                    raise ModelError(f"{folder / file} has no tensor data ({exc}); perturb a full model") from None
    return tensors


def make_tiny_model(
    folder: str | Path,
    family: str = "llama",
    *,
    seed: int = 0,
    num_layers: int = 4,
    hidden: int = 64,
    vocab: int | None = None,
    dtype: torch.dtype | None = None,
    perturb_from: str | Path | None = None,
    perturb_scale: float = 0.01,
    shards: int = 1,
    tie_word_embeddings: bool | None = None,
    layout: str = "new",
    header_only: bool = False,
    tokenizer: str = "bpe",
) -> Path:
    """Write a tiny model folder of `family` and return its path; identical arguments give identical bytes.

    With `perturb_from`, the folder is a "fine-tune" of that parent: same config, tokenizer and tensor
    names, each tensor plus Gaussian noise of `perturb_scale` times the tensor's RMS (seeded by `seed`);
    the structural arguments (family, sizes, layout, tying) then come from the parent.
    `vocab` larger than the tokenizer pads the embedding rows (for vocab-mismatch tests).
    `layout="legacy"` (phi only) writes the old phi-msft layout. `header_only` writes safetensors
    headers without tensor bytes. `tokenizer` is "bpe" or "sentencepiece" (see make_tokenizer_files).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if perturb_from is not None:
        return _perturb(Path(perturb_from), folder, seed, perturb_scale, shards, dtype, header_only)
    from merger.app.tiny_hf import HF_FAMILIES, make_hf_tiny_model

    if family in HF_FAMILIES:
        if layout != "new" or header_only or shards != 1:
            raise ModelError(f"tiny {family} models are written by transformers: one shard, new layout, with data")
        return make_hf_tiny_model(folder, family, seed=seed, num_layers=num_layers, hidden=hidden, vocab=vocab,
                                  dtype=dtype or torch.float16, tie_word_embeddings=tie_word_embeddings,
                                  tokenizer=tokenizer)
    fam = _family(family)
    if layout not in ("new", "legacy") or (layout == "legacy" and family != "phi"):
        raise ModelError(f"layout {layout!r} is not available for {family}; only phi has layout='legacy'")
    dtype = dtype or torch.float16
    if dtype not in _DTYPE_NAMES:
        raise ModelError(f"dtype must be one of float16, bfloat16, float32, got {dtype}")
    tokenizer_size = make_tokenizer_files(folder, family, tokenizer)
    vocab = tokenizer_size if vocab is None else vocab
    if vocab < tokenizer_size:
        raise ModelError(f"vocab {vocab} is smaller than the tokenizer's {tokenizer_size} tokens")
    tied = fam.tied if tie_word_embeddings is None else tie_word_embeddings
    if tied and fam.lm_head_bias:
        raise ModelError(f"{family} has an lm_head bias and cannot tie word embeddings")
    dims = _dims(num_layers, hidden, vocab, fam.kv_heads)
    tensors = {name: init_tensor(name, shape, kind, seed).to(dtype) for name, shape, kind in _tensor_specs(fam, dims, tied)}
    config = _config(fam, dims, tied, dtype, family)
    if layout == "legacy":
        config, tensors = _legacy_phi(config, tensors)
    _dump_json(folder / "config.json", config)
    generation = {k: v for k, v in _special_ids(family).items() if v is not None}
    _dump_json(folder / "generation_config.json", {"_from_model_config": True, **generation})
    _write_weights(folder, tensors, shards, header_only)
    return folder


def _perturb(
    parent: Path, folder: Path, seed: int, scale: float, shards: int, dtype: torch.dtype | None, header_only: bool
) -> Path:
    if not (parent / "config.json").exists():
        raise ModelError(f"perturb_from {parent} is not a model folder (no config.json)")
    for file in sorted(parent.iterdir()):
        if file.suffix != ".safetensors" and file.name != "model.safetensors.index.json" and file.is_file():
            shutil.copyfile(file, folder / file.name)
    tensors = {}
    for name, t in sorted(_read_parent(parent).items()):
        base = t.float()
        rms = base.pow(2).mean().sqrt().item() or 1.0
        noise = torch.randn(base.shape, generator=_generator(seed, "perturb:" + name))
        tensors[name] = (base + scale * rms * noise).to(dtype or t.dtype)
    if dtype is not None:
        config = json.loads((folder / "config.json").read_text())
        config["torch_dtype"] = _DTYPE_NAMES[dtype]
        _dump_json(folder / "config.json", config)
    _write_weights(folder, tensors, shards, header_only)
    return folder
