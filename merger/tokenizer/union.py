"""`tokenizer_source: union`: the base model's tokenizer plus every token another model adds.

As in mergekit 0.1.5: the base tokenizer (tokens with ids past its model's vocab_size stripped) keeps
its ids; then the regular vocabulary tokens of every model that the base lacks are appended as plain
added tokens, then the added tokens of every model (specials keep their flags), each once, models in
recipe order. mergekit walks each tokenizer's vocabulary in hash order, so the ids it gives the new
regular tokens vary from run to run; here they follow each model's own ids, so they are reproducible.
The output is the base's tokenizer files with the new tokens appended to `added_tokens`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from merger.errors import ModelError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
_ADDED_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


@dataclass(frozen=True)
class UnionTokenizer:
    vocab: dict[str, int]  # token -> id in the output tokenizer
    appended: tuple[dict, ...]  # added_tokens entries appended to the base's tokenizer.json


def _read(folder: Path) -> tuple[dict[str, int], list[dict]]:
    path = folder / TOKENIZER_JSON
    if not path.is_file():
        raise ModelError(f"tokenizer_source: union needs a {TOKENIZER_JSON} in {folder}; it has none")
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data.get("model", {}).get("vocab", {})
    if isinstance(vocab, list):  # unigram: [[piece, score], ...]
        vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
    return dict(vocab), list(data.get("added_tokens", []))


def build_union(base: Path, base_rows: int, others: Sequence[tuple[Path, int]]) -> UnionTokenizer:
    """The union vocabulary of `base` (first) and `others`, each given with its model's vocab_size.

    A model without a tokenizer.json is taken to share the base's tokenizer, as mergekit does.
    """
    out: dict[str, int] = {}
    tokenizers = [(base, base_rows)] + [o for o in others if o[0] != base and (o[0] / TOKENIZER_JSON).is_file()]
    read = [(_read(folder), rows) for folder, rows in tokenizers]
    (base_vocab, base_added), _ = read[0]
    for tok, i in sorted({**base_vocab, **{a["content"]: a["id"] for a in base_added}}.items(), key=lambda kv: kv[1]):
        if i < base_rows:
            out[tok] = i
    if sorted(out.values()) != list(range(len(out))):
        raise ModelError(f"the tokenizer of {base} has gaps in its token ids; it cannot start a union vocabulary")
    appended: list[dict] = []

    def append(entry: dict) -> None:
        if entry["content"] not in out:
            out[entry["content"]] = len(out)
            appended.append({"id": out[entry["content"]], **entry})

    added_names = {a["content"] for (_, added), rows in read for a in added if a["id"] < rows}
    for (vocab, _), rows in read:
        for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
            if i < rows and tok not in added_names:
                append({"content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": True, "special": False})
    for (_, added), rows in read:
        for a in sorted(added, key=lambda a: a["id"]):
            if a["id"] < rows:
                append({"content": a["content"], **{k: a.get(k, False) for k in _ADDED_FLAGS}})
    return UnionTokenizer(out, tuple(appended))


def write_union_tokenizer(base: Path, union: UnionTokenizer, out_dir: Path, files: Sequence[str]) -> list[str]:
    """Copy the base's tokenizer `files` into `out_dir` and append the union's new tokens."""
    written = []
    for name in files:
        if (base / name).is_file():
            shutil.copyfile(base / name, out_dir / name)
            written.append(name)
    data = json.loads((out_dir / TOKENIZER_JSON).read_text(encoding="utf-8"))
    data["added_tokens"] = list(data.get("added_tokens", [])) + [dict(e) for e in union.appended]
    (out_dir / TOKENIZER_JSON).write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    config_path = out_dir / TOKENIZER_CONFIG
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if isinstance(config.get("added_tokens_decoder"), dict):
            for e in union.appended:
                config["added_tokens_decoder"][str(e["id"])] = {k: v for k, v in e.items() if k != "id"}
            config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return written
