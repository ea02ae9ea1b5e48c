"""Tokenizer files -> GGUF vocabulary keys, the way llama.cpp's converter writes them.

Byte-level BPE (tokenizer.json) and SentencePiece (tokenizer.model) vocabularies, their special tokens,
and the pre-tokenizer name llama.cpp knows a BPE tokenizer by. Special-token ids that only config.json
carries (bos/eos/pad) come from the config dict passed in, so a GGUF written during a merge, before
config.json exists on disk, has them too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import gguf

from merger.errors import GGUFError

__all__ = ["bpe_pre_tokenizer", "pre_tokenizer_of_folder", "write_vocab"]

# Pre-tokenizer regexes (from tokenizer.json "Split" pre-tokenizers) that llama.cpp knows by name.
_PRE_TOKENIZER_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": "gpt-2",
}


def bpe_pre_tokenizer(tokenizer: dict) -> str:
    """The llama.cpp pre-tokenizer name for a byte-level BPE tokenizer.json, or a GGUFError."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(steps) == 1 and byte_level and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if len(splits) == 1 and len(byte_level) == 1 and not byte_level[0].get("use_regex", True):
        if splits[0] in _PRE_TOKENIZER_REGEXES:
            return _PRE_TOKENIZER_REGEXES[splits[0]]
    raise GGUFError(
        "tokenizer.json has a pre-tokenizer llama.cpp does not know "
        f"({json.dumps(pre)[:120]}...); supported: {', '.join(sorted(set(_PRE_TOKENIZER_REGEXES.values())))}"
    )


def _is_sentencepiece_style(tokenizer: dict) -> bool:
    model = tokenizer.get("model", {})
    return bool(model.get("byte_fallback")) or model.get("type") == "Unigram"


def _write_bpe_vocab(w: gguf.GGUFWriter, folder: Path, tokenizer: dict, n_vocab: int, config: dict) -> None:
    vocab: dict[str, int] = dict(tokenizer["model"]["vocab"])
    special: dict[int, bool] = {}
    for added in tokenizer.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        special[added["id"]] = bool(added.get("special"))
    if max(vocab.values()) >= n_vocab:
        raise GGUFError(
            f"the tokenizer has token id {max(vocab.values())} but the model has only {n_vocab} embedding rows; "
            "resize the embeddings or use the matching tokenizer"
        )
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.NORMAL if i not in special
                else gguf.TokenType.CONTROL if special[i] else gguf.TokenType.USER_DEFINED
            )
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(bpe_pre_tokenizer(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    _special_vocab(folder, n_vocab, config, load_merges=True).add_to_gguf(w, quiet=True)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(buf):
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise GGUFError("tokenizer.model is truncated; download the tokenizer files again")


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a serialized protobuf message: varints as ints, everything else as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, value
            continue
        if wire == 2:
            size, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
        else:
            raise GGUFError("tokenizer.model is not a SentencePiece model; use the model's own tokenizer files")
        yield field, buf[pos:pos + size]
        pos += size


def _adds_dummy_prefix(model: bytes) -> bool:
    """SentencePiece's NormalizerSpec.add_dummy_prefix (ModelProto field 3, its field 3; default true).

    Parsed by hand because sentencepiece's Python API does not expose it and protobuf is not a dependency;
    llama.cpp must be told when it is off (Gemma), or it puts a space before every text.
    """
    for field, value in _proto_fields(model):
        if field == 3 and isinstance(value, bytes):
            flags = [v for f, v in _proto_fields(value) if f == 3]
            return bool(flags[-1]) if flags else True
    return True


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _write_sentencepiece_vocab(w: gguf.GGUFWriter, folder: Path, n_vocab: int, model_config: dict) -> None:
    """tokenizer.model's pieces, scores and types, then the tokens transformers adds on top of it
    (added_tokens.json, tokenizer_config.json's added_tokens_decoder), as llama.cpp's converter does."""
    try:
        import sentencepiece
    except ImportError:
        raise GGUFError(
            f"{folder.name} has a SentencePiece tokenizer.model: install the sentencepiece package to export it"
        ) from None
    model = (folder / "tokenizer.model").read_bytes()
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model)
    except RuntimeError:
        raise GGUFError(
            f"{folder.name}/tokenizer.model is not a SentencePiece model; use the model's own tokenizer files"
        ) from None
    if sp.GetPieceSize() > n_vocab:
        raise GGUFError(
            f"tokenizer.model has {sp.GetPieceSize()} tokens but the model has only {n_vocab} embedding rows"
        )
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [gguf.TokenType.UNUSED] * n_vocab
    for i in range(sp.GetPieceSize()):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = (
            gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
            else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
            else gguf.TokenType.NORMAL
        )
    config = _read_json(folder / "tokenizer_config.json")
    added = [(text, i, False) for text, i in _read_json(folder / "added_tokens.json").items()]
    added += [(a["content"], int(i), bool(a.get("special"))) for i, a in config.get("added_tokens_decoder", {}).items()]
    for text, i, special in added:
        if i >= n_vocab:
            raise GGUFError(
                f"the tokenizer has token id {i} ({text}) but the model has only {n_vocab} embedding rows; "
                "resize the embeddings or use the matching tokenizer"
            )
        # llama.cpp matches user-defined tokens in the raw text, before spaces become "▁"
        tokens[i] = text if special else text.replace("\u2581", " ")
        scores[i] = -1000.0
        types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    # llama.cpp assumes SentencePiece's default dummy prefix; transformers lets the config override it
    prefix = config.get("add_prefix_space")
    if prefix is None and not _adds_dummy_prefix(model):
        prefix = False
    if prefix is not None:
        w.add_add_space_prefix(bool(prefix))
    _special_vocab(folder, n_vocab, model_config).add_to_gguf(w, quiet=True)


def write_vocab(w: gguf.GGUFWriter, folder: Path, n_vocab: int, config: dict, *, sentencepiece_first: bool) -> None:
    """The vocabulary of the tokenizer files in `folder`; `config` is the model's config.json as a dict."""
    json_path, spm_path = folder / "tokenizer.json", folder / "tokenizer.model"
    tokenizer = json.loads(json_path.read_text(encoding="utf-8")) if json_path.exists() else None
    if spm_path.exists() and (tokenizer is None or sentencepiece_first or _is_sentencepiece_style(tokenizer)):
        _write_sentencepiece_vocab(w, folder, n_vocab, config)
    elif tokenizer is not None and tokenizer.get("model", {}).get("type") == "BPE" and not _is_sentencepiece_style(tokenizer):
        _write_bpe_vocab(w, folder, tokenizer, n_vocab, config)
    elif tokenizer is not None:
        raise GGUFError(f"{folder.name}/tokenizer.json is SentencePiece-style; add its tokenizer.model to export GGUF")
    else:
        raise GGUFError(f"{folder} has no tokenizer.json or tokenizer.model; copy the tokenizer files into it")


def _special_vocab(folder: Path, n_vocab: int, config: dict, load_merges: bool = False) -> gguf.SpecialVocab:
    """gguf's SpecialVocab of the tokenizer files, completed with the ids config.json carries.

    SpecialVocab reads those ids from `folder/config.json`; during a merge that file is written only
    after the GGUF, so the ids come from the config dict instead, with SpecialVocab's rules: tokenizer
    files first, then config.json (`text_config` for multimodal configs), ids below n_vocab only.
    """
    special = gguf.SpecialVocab(folder, load_merges=load_merges, n_vocab=n_vocab)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for kind in special.special_token_types:
        tid = config.get(f"{kind}_token_id")
        tid = text.get(f"{kind}_token_id") if tid is None else tid
        if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < n_vocab:
            special.special_token_ids.setdefault(kind, tid)
    return special


def pre_tokenizer_of_folder(folder: str | Path) -> str:
    """The llama.cpp pre-tokenizer name of the BPE tokenizer.json in `folder`, or a GGUFError."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise GGUFError(f"{Path(folder).name} has no tokenizer.json; copy the model's tokenizer files into it")
    return bpe_pre_tokenizer(json.loads(path.read_text(encoding="utf-8")))
