"""`tokenizer: {tokens: {...}}`: per-token embedding settings, as mergekit 0.1.5's TokenEmbeddingConfig.

Each entry names a token of the output vocabulary and where its embedding row comes from:
`source: org/model` (that model's row for the same token), `source: {kind: zero}`, or
`source: {kind: model_token, model: org/model, token: T}` (or `token_id: N`, a row of that model's
tensor). The source is used for the models that lack the token; with `force: true`, for every model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from . import recipe_compat as compat
from .errors import ModelError, RecipeError

TOKEN_KEYS = ("source", "force")
KINDS = ("zero", "model_token")


@dataclass(frozen=True)
class TokenSetting:
    kind: str  # "model" (source: org/model), "zero" or "model_token"
    model: Any = None  # ModelRef for "model" and "model_token"
    token: str | None = None  # model_token: the source model's token ...
    token_id: int | None = None  # ... or its row
    force: bool = False  # use the source for every model, also those that have the token

    def with_model(self, sub: Callable[[Any], Any]) -> "TokenSetting":
        return replace(self, model=sub(self.model)) if self.model is not None else self


def _show(value: Any) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def parse_tokens(value: Any, ref: Callable[[Any, str], Any], warnings: list[str]) -> tuple[tuple[str, TokenSetting], ...]:
    """The `tokenizer.tokens` mapping, checked; `ref(value, where)` parses a model reference."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise RecipeError(f"tokenizer.tokens must be a mapping of tokens to settings like "
                          f"'{{\"<|im_start|>\": {{source: org/model}}}}', not {compat.kind(value)}")
    settings = []
    for token, setting in value.items():
        if not isinstance(token, str) or not token:
            raise RecipeError(f"tokenizer.tokens: '{_show(token)}' is not a token; keys are token strings")
        where = f"tokenizer.tokens['{_show(token)}']"
        setting = compat.known_keys(where, setting, TOKEN_KEYS, warnings)
        force = setting.get("force", False)
        if not isinstance(force, bool):
            raise RecipeError(f"{where}.force must be true or false, not '{_show(force)}'")
        source = setting.get("source")
        if source is None:
            raise RecipeError(f"{where} needs a source: a model name, {{kind: zero}} or "
                              "{kind: model_token, model: org/model, token: T}")
        if not isinstance(source, dict):
            settings.append((token, TokenSetting("model", ref(source, f"{where}.source"), force=force)))
            continue
        kind = source.get("kind")
        if kind not in KINDS:
            raise RecipeError(f"{where}.source kind '{_show(kind)}' is unknown; use 'zero' or 'model_token' "
                              "(or give a model name as the source)")
        if kind == "zero":
            compat.known_keys(f"{where}.source", source, ("kind",), warnings)
            settings.append((token, TokenSetting("zero", force=force)))
            continue
        source = compat.known_keys(f"{where}.source", source, ("kind", "model", "token", "token_id"), warnings)
        if source.get("model") is None:
            raise RecipeError(f"{where}.source: kind model_token needs a model, e.g. 'model: org/model'")
        name, number = source.get("token"), source.get("token_id")
        if (name is None) == (number is None):
            raise RecipeError(f"{where}.source: kind model_token needs exactly one of token and token_id")
        if name is not None and not isinstance(name, str):
            raise RecipeError(f"{where}.source.token must be a token string, not '{_show(name)}'")
        if number is not None and (isinstance(number, bool) or not isinstance(number, int) or number < 0):
            raise RecipeError(f"{where}.source.token_id must be a row number (0 or more), not '{_show(number)}'")
        settings.append((token, TokenSetting("model_token", ref(source["model"], f"{where}.source.model"),
                                             name, number, force)))
    return tuple(settings)


def check_token_models(tokens: tuple[tuple[str, TokenSetting], ...], merged: list[Any]) -> None:
    """Every model a token setting takes a row from must be one of the merged models."""
    for token, setting in tokens:
        if setting.model is not None and setting.model not in merged:
            raise RecipeError(f"tokenizer.tokens['{_show(token)}'] takes its embedding from {setting.model}, "
                              f"which is not merged here; use one of: {', '.join(map(str, merged))}")


def resolve_row(token: str, setting: TokenSetting, vocab: Mapping[str, int] | None, rows: int, model: Any) -> int:
    """The row of `model`'s tensor (of `rows` rows) that a model_token setting takes."""
    where = f"tokenizer.tokens['{_show(token)}']"
    if setting.token_id is not None:
        row = setting.token_id
    else:
        if vocab is None or setting.token not in vocab:
            raise ModelError(f"{where}: the tokenizer of {model} has no token '{_show(setting.token)}'")
        row = vocab[setting.token]
    if row >= rows:
        raise ModelError(f"{where}: token id {row} is out of range for {model}, whose embeddings have {rows} rows")
    return row
