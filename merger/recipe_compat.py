"""mergekit 0.1.5's other recipe forms and its leniency, brought to the one form `merger.recipe` parses.

mergekit accepts more than `models:` / `slices:` with string model names: a `modules:` mapping (it
writes that form into model cards itself), model references as mappings with a `revision`, and keys
it does not know, which its pydantic models drop without a word. A recipe copied from a model card
must run as mergekit ran it, so here the other forms are rewritten to the usual one, and every
dropped key becomes a warning that says what was probably meant (`--strict` turns them into errors).
Files that are not merge recipes at all (a mergekit-evolve genome, a mergekit-moe config) are
refused with one line that says what they are.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable

from .errors import RecipeError

IGNORED = "mergekit 0.1.5 ignores it, so a model published from this recipe was made without it"
SINGLE_MODULE = "default"  # mergekit's module name for single-module (text-only) architectures
_PATH_KEYS = ("path", "revision")
_REFERENCE_KEYS = ("model", "lora", "override_architecture")


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """" did you mean 'x'?" for the closest option, or ""."""
    close = difflib.get_close_matches(str(word).replace("-", "_").lower(), list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def ignored_key(where: str, key: Any, allowed: Iterable[str]) -> str:
    """The warning for a key mergekit drops: what it is, the likely fix, and what that means."""
    allowed = list(allowed)
    hint = did_you_mean(str(key), allowed)
    if key == "revision" and "model" in allowed:
        hint = "; to merge a revision, write it after the name: 'model: org/name@revision'"
    return f"{where}: '{_short(key)}' is ignored{hint} ({IGNORED}; keys read here: {', '.join(allowed)})"


def known_keys(where: str, mapping: Any, allowed: tuple[str, ...], warnings: list[str]) -> dict:
    """`mapping` without the keys mergekit would drop, each dropped key noted in `warnings`."""
    if not isinstance(mapping, dict):
        raise RecipeError(f"{where} must be a mapping of keys ({', '.join(allowed)}), not {kind(mapping)}")
    kept = {}
    for key, value in mapping.items():
        if key in allowed:
            kept[key] = value
        else:
            warnings.append(ignored_key(where, key, allowed))
    return kept


def refuse_other_configs(data: dict) -> None:
    """One line for YAML files that are not merge recipes (evolve genomes, MoE keys beside a merge_method)."""
    if "genome" in data or ("tasks" in data and "merge_method" not in data):
        raise RecipeError("this is a mergekit-evolve configuration (genome and tasks), not a merge recipe; "
                          "run the evolution with mergekit-evolve and merge its best recipe here")
    if "experts" in data or "gate_mode" in data:
        raise RecipeError("this mixes a mergekit-moe configuration (experts, gate_mode) with a merge recipe "
                          "(merge_method); a MoE config lists `experts:` with no merge_method, a merge recipe "
                          "has no experts: keep one of the two")


def model_reference(value: Any, where: str) -> Any:
    """mergekit's mapping forms of a model reference as the string form `path@revision[+lora]`.

    `{model: org/name, lora: org/adapter}` and `{model: {path: org/name, revision: v1}}` are accepted
    by mergekit 0.1.5; strings pass through.
    """
    if not isinstance(value, dict):
        return value
    unknown = [k for k in value if k not in _REFERENCE_KEYS]
    if unknown or "model" not in value:
        raise RecipeError(f"{where} must be a Hub repo ID like 'org/name' (or a mapping with 'model' and "
                          f"optionally 'lora'), not a mapping with {', '.join(map(_short, value))}")
    if value.get("override_architecture") is not None:
        raise RecipeError(f"{where}: override_architecture is not supported; the architecture is read from the "
                          "model's config.json")
    text = _model_path(value["model"], f"{where}.model")
    if value.get("lora") is not None:
        text += "+" + _model_path(value["lora"], f"{where}.lora")
    return text


def _model_path(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, dict) or "path" not in value or any(k not in _PATH_KEYS for k in value):
        raise RecipeError(f"{where} must be 'org/name', 'org/name@revision' or {{path: ..., revision: ...}}")
    path, revision = value["path"], value.get("revision")
    if not isinstance(path, str) or (revision is not None and not isinstance(revision, str)):
        raise RecipeError(f"{where}: path and revision must be strings")
    if revision is not None and "@" in path:
        raise RecipeError(f"{where}: give the revision either after '@' or as 'revision:', not both")
    return f"{path}@{revision}" if revision else path


def flatten_modules(data: dict, warnings: list[str]) -> dict:
    """`modules: {default: {models|slices, parameters}}` as the `models:`/`slices:` form.

    mergekit reads a module's parameters after a slice's and before the top level's; folding them
    into the top level keeps that order (see `fallback_setting`).
    """
    modules = data["modules"]
    if not isinstance(modules, dict) or not modules:
        raise RecipeError("'modules:' must map a module name ('default' for text models) to its models or slices")
    names = list(modules)
    if names != [SINGLE_MODULE]:
        raise RecipeError(f"'modules:' names {', '.join(map(_short, names))}; only the single module "
                          f"'{SINGLE_MODULE}' of text-only models is supported (multi-module vision-language "
                          "merges are not)")
    if "models" in data or "slices" in data:
        raise RecipeError("the recipe needs exactly one of 'models:', 'slices:' or 'modules:'")
    where = f"modules.{SINGLE_MODULE}"
    module = known_keys(where, modules[SINGLE_MODULE], ("models", "slices", "parameters"), warnings)
    if bool(module.get("models")) == bool(module.get("slices")):
        raise RecipeError(f"{where} needs exactly one of 'models:' or 'slices:'")
    out = {k: v for k, v in data.items() if k != "modules"}
    out.update({k: v for k, v in module.items() if k != "parameters"})
    own = module.get("parameters") or {}
    top = data.get("parameters") or {}
    if not isinstance(own, dict) or not isinstance(top, dict):
        raise RecipeError("parameters must be a mapping like 'weight: 0.5'")
    if own:
        out["parameters"] = {name: fallback_setting(own[name], top[name]) if name in top else own[name]
                             for name in own} | {name: top[name] for name in top if name not in own}
    return out


def fallback_setting(first: Any, then: Any) -> Any:
    """One setting equal to resolving `first` and, where it yields nothing, `then`.

    Only a list of conditions can yield nothing (no filter matches); its conditions are followed by
    `then` as conditions, so the first match still wins.
    """
    if isinstance(first, dict):
        first = [first]
    if not isinstance(first, list) or not first or not all(isinstance(c, dict) for c in first):
        return first
    if isinstance(then, dict):
        then = [then]
    if isinstance(then, list) and then and all(isinstance(c, dict) for c in then):
        return first + then
    return first + [{"value": then}]


def kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "empty"}.get(
        type(value), f"a {type(value).__name__}")


def _short(value: Any) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= 60 else text[:57] + "..."
