"""Models whose tokenizers differ, merged with `tokenizer_source: base`, a model, or `union`: the
embedding rows of tokens some model lacks follow mergekit 0.1.5's rule (the one model that has the
token gives its row, else the base, else the mean of the models that have it), and the whole
checkpoint equals mergekit's (token by token for the union, whose new ids mergekit assigns in hash
order). The output tokenizer loads in transformers and encodes the added tokens to their ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from merger.app.tiny import make_tiny_model
from merger.errors import MergerError
from tests.test_parity import run_both, ulps, weights


def _with_tokens(folder: Path, tokens: list[str]) -> Path:
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.add_tokens(tokens)
    tok.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == len(tok), (config["vocab_size"], len(tok))
    return folder


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    base = make_tiny_model(root / "base", "llama", seed=5)
    rows = json.loads((base / "config.json").read_text())["vocab_size"]
    a = _with_tokens(make_tiny_model(root / "a", "llama", seed=6, vocab=rows + 2), ["<|a1|>", "<|a2|>"])
    b = _with_tokens(make_tiny_model(root / "b", "llama", seed=7, vocab=rows + 3), ["<|a1|>", "<|b1|>", "<|b2|>"])
    return {"BASE": base, "A": a, "B": b, "rows": rows}


RECIPES = {
    "linear-source-a": "models:\n  - {model: BASE, parameters: {weight: 0.2}}\n  - {model: A, parameters: {weight: 0.5}}\n"
                       "  - {model: B, parameters: {weight: 0.3}}\nmerge_method: linear\ntokenizer_source: A\n",
    "ties-base-lacks": "models:\n  - {model: BASE}\n  - {model: A, parameters: {weight: 0.6, density: 1.0}}\n"
                       "  - {model: B, parameters: {weight: 0.4, density: 1.0}}\n"
                       "merge_method: ties\nbase_model: BASE\ntokenizer_source: A\n",
    "task-arithmetic-base-b": "models:\n  - {model: B}\n  - {model: A, parameters: {weight: 0.5}}\n"
                              "  - {model: BASE, parameters: {weight: 0.5}}\n"
                              "merge_method: task_arithmetic\nbase_model: B\ntokenizer_source: base\n",
}


def _text(recipe: str, trio) -> str:
    text = recipe + "dtype: float32\n"
    for key in ("BASE", "A", "B"):
        text = text.replace(f"model: {key}", f"model: {trio[key]}").replace(f"_model: {key}", f"_model: {trio[key]}")
        text = text.replace(f"tokenizer_source: {key}\n", f"tokenizer_source: {trio[key]}\n")
    return text


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_differing_tokenizers_match_mergekit(name: str, trio, tmp_path: Path) -> None:
    ours, theirs, _ = run_both(_text(RECIPES[name], trio), tmp_path)
    assert set(ours) == set(theirs)
    for tensor in ours:
        assert ours[tensor].shape == theirs[tensor].shape, tensor
        # (ties with density 1: sign election only; a trim would keep an arbitrary subset of the fp16
        # deltas tied at its threshold, see test_parity)
        assert (ulps(ours[tensor], theirs[tensor]) > 1.01).sum() == 0, tensor
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert len(tok) == ours["model.embed_tokens.weight"].shape[0]
    assert transformers.AutoConfig.from_pretrained(tmp_path / "ours").vocab_size == len(tok)


def test_missing_token_rows_follow_mergekits_rule(trio, tmp_path: Path) -> None:
    """linear over BASE, A, B with A's tokenizer: <|a2|> only A has (A's row for everyone), <|a1|> A
    and B have (their mean for BASE); the merge is the weighted mean of those rows."""
    ours, _, _ = run_both(_text(RECIPES["linear-source-a"], trio), tmp_path)
    rows = trio["rows"]
    e = {k: weights(trio[k])["model.embed_tokens.weight"].float() for k in ("BASE", "A", "B")}
    out = ours["model.embed_tokens.weight"]
    a1_b = e["B"][rows]  # <|a1|> is B's first added token
    a1_default = (e["A"][rows] + a1_b) / 2
    expected_a1 = (0.2 * a1_default + 0.5 * e["A"][rows] + 0.3 * a1_b) / 1.0
    expected_a2 = e["A"][rows + 1]  # every model takes A's row, weights sum to 1
    torch.testing.assert_close(out[rows], expected_a1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[rows + 1], expected_a2, rtol=1e-5, atol=1e-6)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert tok.convert_tokens_to_ids(["<|a1|>", "<|a2|>"]) == [rows, rows + 1]


UNION = {
    "linear-union": "models:\n  - {model: BASE, parameters: {weight: 0.2}}\n  - {model: A, parameters: {weight: 0.5}}\n"
                    "  - {model: B, parameters: {weight: 0.3}}\nmerge_method: linear\nbase_model: BASE\n"
                    "tokenizer_source: union\n",
    "task-arithmetic-union": "models:\n  - {model: BASE}\n  - {model: A, parameters: {weight: 0.6}}\n"
                             "  - {model: B, parameters: {weight: 0.4}}\n"
                             "merge_method: task_arithmetic\nbase_model: BASE\ntokenizer: {source: union}\n",
    "ties-union-padded": "models:\n  - {model: BASE}\n  - {model: A, parameters: {weight: 0.6, density: 1.0}}\n"
                         "  - {model: B, parameters: {weight: 0.4, density: 1.0}}\n"
                         "merge_method: ties\nbase_model: BASE\ntokenizer: {pad_to_multiple_of: 100}\n",
}


@pytest.mark.parametrize("name", sorted(UNION))
def test_union_tokenizer_matches_mergekit_token_by_token(name: str, trio, tmp_path: Path) -> None:
    """mergekit numbers the new tokens in hash order (run to run), so rows are compared by token."""
    ours, theirs, _ = run_both(_text(UNION[name], trio), tmp_path)
    ours_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    theirs_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "theirs")
    ours_vocab, theirs_vocab = ours_tok.get_vocab(), theirs_tok.get_vocab()
    assert set(ours_vocab) == set(theirs_vocab)
    assert len(ours_vocab) == trio["rows"] + 4  # <|a1|> (A and B), <|a2|> (A), <|b1|>, <|b2|> (B)
    tokens = sorted(ours_vocab)
    rows = 500 if "padded" in name else len(tokens)  # pad_to_multiple_of: 100 -> each model's mean row
    for tensor in ours:
        a, b = ours[tensor], theirs[tensor]
        assert a.shape == b.shape, tensor
        if a.shape[0] == rows:
            assert (ulps(a[len(tokens):], b[len(tokens):]) > 1.01).sum() == 0, tensor
            a = a[[ours_vocab[t] for t in tokens]]
            b = b[[theirs_vocab[t] for t in tokens]]
        assert (ulps(a, b) > 1.01).sum() == 0, tensor
    new = ["<|a1|>", "<|a2|>", "<|b1|>", "<|b2|>"]  # base first, then each model's tokens in recipe order
    assert ours_tok.convert_tokens_to_ids(new) == list(range(trio["rows"], trio["rows"] + 4))
    assert transformers.AutoConfig.from_pretrained(tmp_path / "ours").vocab_size == rows
    assert ours["model.embed_tokens.weight"].shape[0] == rows
    ids = ours_tok("hello <|b2|>", add_special_tokens=False).input_ids
    assert ids[-1] == ours_vocab["<|b2|>"]


def test_union_tokenizer_round_trips_through_gguf(trio, tmp_path: Path) -> None:
    """The union output converts to GGUF with every token, the new ones at their ids and typed as
    user-defined tokens, and llama.cpp's token list equals transformers' vocabulary."""
    import gguf

    from quantize.convert import convert_folder

    run_both(_text(UNION["linear-union"], trio), tmp_path)
    (path,) = convert_folder(tmp_path / "ours", tmp_path / "union.gguf", "f32")
    fields = gguf.GGUFReader(path).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    vocab = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours").get_vocab()
    assert len(tokens) == len(vocab) == trio["rows"] + 4
    assert all(tokens[i] == tok for tok, i in vocab.items())
    kinds = fields["tokenizer.ggml.token_type"].contents()
    assert kinds[vocab["<|b2|>"]] == gguf.TokenType.USER_DEFINED


def test_union_takes_a_model_without_tokenizer_json_to_share_the_bases(trio, tmp_path: Path) -> None:
    from merger.tokenizer import build_union

    bare = tmp_path / "bare"
    bare.mkdir()
    rows = trio["rows"]
    union = build_union(trio["BASE"], rows, [(bare, rows + 9), (trio["B"], rows + 3)])
    assert len(union.vocab) == rows + 3 and [e["content"] for e in union.appended] == ["<|a1|>", "<|b1|>", "<|b2|>"]
    with pytest.raises(MergerError, match="needs a tokenizer.json"):
        build_union(bare, rows, [(trio["B"], rows + 3)])


def _token_recipe(trio, source: str) -> tuple[str, list[str]]:
    """linear over BASE, A, B with `tokenizer.tokens`: a token every model has forced to zero, one forced
    to A's row, a token only B has lent A's <|a2|> row (BASE and A lack it), a new token (only B) forced
    to BASE's row 3 for every model, <|a1|> (A and B) lent A's <|a2|> row for BASE while A keeps its own
    <|a1|>, <|a2|> taken from A, its only model, and <|new|>, no model's token, which the output tokenizer
    gains (as mergekit's add_tokens), forced to B's <|b2|> row."""
    base_tok = transformers.AutoTokenizer.from_pretrained(trio["BASE"])
    common = base_tok.convert_ids_to_tokens([10, 11])
    a, b, base = (str(trio[k]) for k in ("A", "B", "BASE"))
    tokens = {
        common[0]: {"source": {"kind": "zero"}, "force": True},
        common[1]: {"source": a, "force": True},
        "<|b1|>": {"source": {"kind": "model_token", "model": a, "token": "<|a2|>"}},
        "<|b2|>": {"source": {"kind": "model_token", "model": base, "token_id": 3}, "force": True},
        "<|a1|>": {"source": {"kind": "model_token", "model": a, "token": "<|a2|>"}},  # A keeps its own <|a1|>
        "<|a2|>": {"source": a},  # only A has it (with source B, B's tokenizer gains it)
        "<|new|>": {"source": {"kind": "model_token", "model": b, "token": "<|b2|>"}, "force": True},  # no model's
    }
    text = (f"models:\n  - {{model: {base}, parameters: {{weight: 0.2}}}}\n  - {{model: {a}, parameters: "
            f"{{weight: 0.5}}}}\n  - {{model: {b}, parameters: {{weight: 0.3}}}}\nmerge_method: linear\n"
            f"base_model: {base}\ndtype: float32\n"
            f"tokenizer: {json.dumps({'source': source if source == 'union' else trio[source].as_posix(), 'tokens': tokens})}\n")
    return text, common


@pytest.mark.parametrize("source", ["union", "B"])
def test_token_settings_match_mergekit(source: str, trio, tmp_path: Path) -> None:
    """tokenizer.tokens (zero, a model's row, a model's other token, force) equals mergekit 0.1.5 token
    by token, and the rows are what the settings say."""
    text, common = _token_recipe(trio, source)
    ours, theirs, _ = run_both(text, tmp_path)
    ours_vocab = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours").get_vocab()
    theirs_vocab = transformers.AutoTokenizer.from_pretrained(tmp_path / "theirs").get_vocab()
    assert set(ours_vocab) == set(theirs_vocab)
    tokens = sorted(ours_vocab)
    for tensor in ours:
        a, b = ours[tensor], theirs[tensor]
        assert a.shape == b.shape, tensor
        if a.shape[0] == len(tokens):
            a, b = a[[ours_vocab[t] for t in tokens]], b[[theirs_vocab[t] for t in tokens]]
        assert (ulps(a, b) > 1.01).sum() == 0, tensor
    e = {k: weights(trio[k])["model.embed_tokens.weight"].float() for k in ("BASE", "A", "B")}
    out = ours["model.embed_tokens.weight"]
    rows = trio["rows"]
    assert not out[ours_vocab[common[0]]].any()
    torch.testing.assert_close(out[ours_vocab[common[1]]], e["A"][11])
    torch.testing.assert_close(out[ours_vocab["<|b2|>"]], e["BASE"][3])
    torch.testing.assert_close(out[ours_vocab["<|new|>"]], e["B"][rows + 2])
    torch.testing.assert_close(out[ours_vocab["<|a2|>"]], e["A"][rows + 1])
    assert ours_vocab["<|new|>"] == len(ours_vocab) - 1
    assert transformers.AutoConfig.from_pretrained(tmp_path / "ours").vocab_size == len(ours_vocab) == out.shape[0]
    torch.testing.assert_close(out[ours_vocab["<|b1|>"]], 0.7 * e["A"][rows + 1] + 0.3 * e["B"][rows + 1],
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[ours_vocab["<|a1|>"]], 0.2 * e["A"][rows + 1] + 0.5 * e["A"][rows] + 0.3 * e["B"][rows],
                               rtol=1e-5, atol=1e-6)


def _plan(text: str):
    from merger.engine import plan_merge
    from merger.pipeline import inspect_models, load_vocab, resolve_local
    from merger.recipe import parse_recipe

    recipe = parse_recipe(text)
    folders = resolve_local(recipe)
    infos = inspect_models(recipe, folders, allow_bin=False)
    vocabs = {ref: v for ref in infos if (v := load_vocab(folders[ref])) is not None}
    return plan_merge(recipe, infos, vocabs=vocabs)


@pytest.mark.parametrize("setting,message", [
    ('{"source": {"kind": "model_token", "model": "A", "token": "<|zz|>"}}',
     r"tokenizer.tokens\['<\|b1\|>'\]: the tokenizer of .*a has no token '<\|zz\|>'"),
    ('{"source": {"kind": "model_token", "model": "A", "token_id": 100000}}',
     r"token id 100000 is out of range for .*a, whose embeddings have \d+ rows"),
    ('{"source": "A"}', r"tokenizer.tokens\['<\|b1\|>'\]: .*a has no token '<\|b1\|>'"),
])
def test_token_settings_that_cannot_apply_are_refused_in_one_line(setting: str, message: str, trio) -> None:
    setting = setting.replace('"A"', json.dumps(str(trio["A"]))).replace('"B"', json.dumps(str(trio["B"])))
    text = (f"models:\n  - {{model: {trio['A']}}}\n  - {{model: {trio['B']}}}\nmerge_method: linear\n"
            f"parameters: {{weight: 0.5}}\ntokenizer: {{source: {trio['B']}, tokens: {{'<|b1|>': {setting}}}}}\n")
    with pytest.raises(MergerError, match=message) as e:
        _plan(text)
    assert "\n" not in str(e.value)


def test_a_lent_row_across_dtypes_is_refused_in_one_line(trio, tmp_path: Path) -> None:
    """B keeps its own <|b1|> and lends its <|a1|> row to C, which lacks <|b1|>: C's embedding read
    carries B's row, so they must share a dtype (C is bfloat16, B float16)."""
    c = _with_tokens(make_tiny_model(tmp_path / "c", "llama", seed=8, vocab=trio["rows"] + 2,
                                     dtype=torch.bfloat16), ["<|a1|>", "<|a2|>"])
    setting = f"{{source: {{kind: model_token, model: {trio['B']}, token: '<|a1|>'}}}}"
    text = (f"models:\n  - {{model: {c}}}\n  - {{model: {trio['B']}}}\nmerge_method: linear\n"
            f"parameters: {{weight: 0.5}}\ntokenizer: {{source: {trio['B']}, tokens: {{'<|b1|>': {setting}}}}}\n")
    with pytest.raises(MergerError, match=r"keeps its own row for '<\|b1\|>' and its other row cannot be staged "
                                          r"here \(the models' dtypes differ\); add force: true"):
        _plan(text)
