"""mergekit-compatible YAML recipes: safe parsing, strict validation, parameter resolution.

The schema is mergekit 0.1.5's (`models:`, `slices:` or `modules:`, `merge_method`, `base_model`,
`parameters`, `dtype`, `out_dtype`, `tokenizer_source`/`tokenizer`, `chat_template`). What mergekit
accepts runs; keys it silently drops become warnings with the likely fix (`Recipe.warnings`), and
misspelled methods, out-of-range values and wrong types are refused with one line that says how to
fix them.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from . import recipe_compat as compat
from .errors import RecipeError
from .recipe_tokens import TokenSetting, check_token_models, parse_tokens
from .model_ref import ModelRef, parse_model_ref  # noqa: F401  (callers import ModelRef from here)
from .output import CHAT_TEMPLATES as NAMED_CHAT_TEMPLATES
from .recipe_yaml import (MAX_RECIPE_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, _one_line, _short,  # noqa: F401
                          load_yaml)

# Safe YAML reading lives in merger.recipe_yaml, model references in merger.model_ref; their names stay
# importable from here.

MAX_MODELS = 64  # distinct models in one recipe: far above real merges, bounds Hub requests per check

DTYPES = {
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}

TOP_KEYS = ("models", "slices", "merge_method", "base_model", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "name")
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")

Scalar = bool | int | float | str


@dataclass(frozen=True)
class InputModel:
    model: ModelRef
    params: Mapping[str, Any] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None


@dataclass(frozen=True)
class Slice:
    sources: tuple[InputModel, ...]
    base_model: ModelRef | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    method: str
    base_model: ModelRef | None
    models: tuple[InputModel, ...]
    slices: tuple[Slice, ...] | None
    params: Mapping[str, Any]
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | ModelRef | None
    chat_template: str | None
    text: str
    warnings: tuple[str, ...] = ()  # keys mergekit ignores, each with its likely fix
    pad_to_multiple_of: int | None = None  # tokenizer.pad_to_multiple_of: embedding rows rounded up
    tokens: tuple[tuple[str, TokenSetting], ...] = ()  # tokenizer.tokens: per-token embedding sources

    def referenced_models(self) -> list[ModelRef]:
        """Every model the recipe needs, base first, each once, in order of appearance."""
        candidates: list[ModelRef | None] = [self.base_model]
        candidates += [m.model for m in self.models]
        for s in self.slices or ():
            candidates += [s.base_model] + [src.model for src in s.sources]
        if isinstance(self.tokenizer_source, ModelRef):
            candidates.append(self.tokenizer_source)
        return list(dict.fromkeys(ref for ref in candidates if ref is not None))  # stays linear for 10^4 entries

    def merged_models(self) -> list[ModelRef]:
        """The models whose weights are merged (base and inputs), each once."""
        candidates = [self.base_model] + [m.model for m in self.models]
        for s in self.slices or ():
            candidates += [s.base_model] + [src.model for src in s.sources]
        return list(dict.fromkeys(ref for ref in candidates if ref is not None))

    @property
    def output_dtype(self) -> str | None:
        return self.out_dtype or self.dtype

    def with_models(self, mapping: Mapping[ModelRef, ModelRef]) -> "Recipe":
        """The same recipe with model references substituted (Hub IDs -> downloaded folders)."""
        def sub(ref: ModelRef | None) -> ModelRef | None:
            return mapping.get(ref, ref) if ref is not None else None

        def sub_input(m: InputModel) -> InputModel:
            return InputModel(sub(m.model), m.params, m.layer_range)

        slices = None
        if self.slices is not None:
            slices = tuple(Slice(tuple(sub_input(s) for s in sl.sources), sub(sl.base_model), sl.params)
                           for sl in self.slices)
        tok = sub(self.tokenizer_source) if isinstance(self.tokenizer_source, ModelRef) else self.tokenizer_source
        return Recipe(self.method, sub(self.base_model), tuple(sub_input(m) for m in self.models), slices,
                      self.params, self.dtype, self.out_dtype, tok, self.chat_template, self.text, self.warnings,
                      self.pad_to_multiple_of, tuple((t, s.with_model(sub)) for t, s in self.tokens))


# ---------------------------------------------------------------- validation helpers

def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word).replace("-", "_").lower(), list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _validate_setting(where: str, setting: Any, param: Any, warnings: list[str]) -> None:
    """Check a parameter setting's structure and every scalar in it against the method's Param."""
    if _is_scalar(setting):
        _validate_scalar(where, setting, param)
        return
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list) or not setting:
        raise RecipeError(f"{where} must be a number, a list of numbers (a gradient) or a list of "
                          f"{{filter: ..., value: ...}} conditions, not {compat.kind(setting)}")
    if all(_is_scalar(v) for v in setting):
        for v in setting:
            _validate_scalar(where, v, param)
        return
    for i, cond in enumerate(setting):
        if not isinstance(cond, dict):
            raise RecipeError(f"{where}[{i}] mixes conditions and plain values; write each entry as "
                              "{filter: ..., value: ...}, the last one as {value: ...}")
        compat.known_keys(f"{where}[{i}]", cond, ("filter", "value"), warnings)
        if "value" not in cond:
            raise RecipeError(f"{where}[{i}] has no 'value'; add one")
        if "filter" in cond and cond["filter"] is not None and not isinstance(cond["filter"], str):
            raise RecipeError(f"{where}[{i}].filter must be a substring of tensor names, like 'q_proj'")
        value = cond["value"]
        if isinstance(value, list):
            if not value or not all(_is_scalar(v) for v in value):
                raise RecipeError(f"{where}[{i}].value must be a number or a list of numbers")
            for v in value:
                _validate_scalar(f"{where}[{i}].value", v, param)
        else:
            _validate_scalar(f"{where}[{i}].value", value, param)


def _validate_scalar(where: str, value: Any, param: Any) -> None:
    try:
        coerced = coerce(value, param.kind)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer too large for a float
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(param.kind, param.kind.__name__)
        raise RecipeError(f"{where} must be {kind}, not '{_short(value)}'") from None
    problem = param.validate(coerced)
    if problem:
        raise RecipeError(f"{where}: {problem}")


def coerce(value: Any, kind: type) -> Any:
    """mergekit-compatible scalar coercion (YAML '1e-3' strings become numbers, finite only)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise ValueError(value)
    if kind in (int, float):
        if isinstance(value, bool):
            raise TypeError(value)
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(value)
        if kind is int:
            if number != int(number):
                raise ValueError(value)
            return int(number)
        return number
    if not isinstance(value, str):
        raise TypeError(value)
    return value


# ---------------------------------------------------------------- parsing

def parse_recipe(text: str, *, allow_local: bool = True, base_dir: str | Path | None = None) -> Recipe:
    """Parse and validate a recipe. Raises RecipeError with one line on any problem; keys mergekit
    ignores are dropped and described in `Recipe.warnings`. A mergekit-moe config (`experts:`, no
    `merge_method`) gives a merger.moe.MoERecipe instead."""
    warnings: list[str] = []
    try:
        return _parse(text, allow_local, base_dir, warnings)
    except RecipeError as e:
        if warnings:  # an ignored key is often the cause (a misspelt 'parameters'): say so on the same line
            raise RecipeError(f"{e} (note: {warnings[0]})") from None
        raise


def _parse(text: str, allow_local: bool, base_dir: str | Path | None, warnings: list[str]) -> Recipe:
    from .methods import get_method  # the method registry decides which parameters exist

    if not isinstance(text, str):
        raise RecipeError("the recipe must be YAML text")
    data = load_yaml(text, warnings)
    if data is None:
        raise RecipeError("the recipe is empty; start from an example such as "
                          "'merge_method: linear' with a 'models:' list")
    if not isinstance(data, dict):
        raise RecipeError(f"the recipe must be a mapping of keys ({', '.join(TOP_KEYS)}), not {compat.kind(data)}")
    from .moe.config import is_moe_config, parse_moe  # mergekit-moe configs are recipes too

    if is_moe_config(data):
        return parse_moe(data, text, allow_local=allow_local, base_dir=base_dir)
    compat.refuse_other_configs(data)
    if "modules" in data:
        data = compat.flatten_modules(data, warnings)
    data = compat.known_keys("the recipe", data, TOP_KEYS, warnings)
    if "merge_method" not in data:
        raise RecipeError("the recipe has no 'merge_method'; add one, e.g. 'merge_method: slerp'")
    if not isinstance(data["merge_method"], str):
        raise RecipeError("merge_method must be a method name such as 'ties', not "
                          f"{compat.kind(data['merge_method'])}")
    method = get_method(data["merge_method"].strip())
    bdir = Path(base_dir) if base_dir else None

    def ref(value: Any, where: str) -> ModelRef:
        return parse_model_ref(compat.model_reference(value, where), where, allow_local=allow_local, base_dir=bdir)

    accepted = {p.name: p for p in method.params}

    def params(where: str, value: Any, scope: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise RecipeError(f"{where} must be a mapping like 'weight: 0.5', not {compat.kind(value)}")
        kept = {}
        for name, setting in value.items():
            if name not in accepted:
                known = ", ".join(sorted(accepted)) or "none"
                warnings.append(f"{where}: '{_short(name)}' is not a parameter of {method.name} and is ignored"
                                f"{compat.did_you_mean(str(name), accepted)} ({compat.IGNORED}; "
                                f"{method.name}'s parameters: {known})")
                continue
            param = accepted[name]
            if scope == "model" and not param.per_model:
                warnings.append(f"{where}: '{name}' applies to the whole merge and is ignored under one model; "
                                f"move it to the top-level 'parameters:' ({compat.IGNORED})")
                continue
            _validate_setting(f"{where}.{name}", setting, param, warnings)
            kept[name] = setting
        return kept

    base = ref(data["base_model"], "base_model") if data.get("base_model") is not None else None
    has_models, has_slices = "models" in data, "slices" in data
    if has_models == has_slices:
        raise RecipeError("the recipe needs exactly one of 'models:' (merge whole models) or "
                          "'slices:' (merge or stack layer ranges)")
    models: list[InputModel] = []
    slices: list[Slice] | None = None
    if has_models:
        if not isinstance(data["models"], list) or not data["models"]:
            raise RecipeError("'models:' must be a non-empty list of entries like '- model: org/name'")
        named = {repr(e.get("model") if isinstance(e, dict) else e) for e in data["models"]}
        if len(named) > MAX_MODELS:  # before checking each entry: a huge list is refused in milliseconds
            raise RecipeError(f"the recipe names {len(named)} different models; at most {MAX_MODELS} can be "
                              "merged in one recipe")
        for i, entry in enumerate(data["models"]):
            where = f"models[{i}]"
            if isinstance(entry, str):
                entry = {"model": entry}
            entry = compat.known_keys(where, entry, MODEL_KEYS, warnings)
            if "model" not in entry:
                raise RecipeError(f"{where} has no 'model'; add '- model: org/name'")
            models.append(InputModel(ref(entry["model"], f"{where}.model"),
                                     params(f"{where}.parameters", entry.get("parameters"), "model")))
    else:
        if not isinstance(data["slices"], list) or not data["slices"]:
            raise RecipeError("'slices:' must be a non-empty list of entries with 'sources:'")
        slices = []
        for i, entry in enumerate(data["slices"]):
            where = f"slices[{i}]"
            entry = compat.known_keys(where, entry, SLICE_KEYS, warnings)
            sources = entry.get("sources")
            if not isinstance(sources, list) or not sources:
                raise RecipeError(f"{where}.sources must be a non-empty list of "
                                  "'- model: ..., layer_range: [start, end]'")
            parsed = []
            for j, src in enumerate(sources):
                swhere = f"{where}.sources[{j}]"
                src = compat.known_keys(swhere, src, SOURCE_KEYS, warnings)
                if "model" not in src:
                    raise RecipeError(f"{swhere} has no 'model'")
                parsed.append(InputModel(ref(src["model"], f"{swhere}.model"),
                                         params(f"{swhere}.parameters", src.get("parameters"), "model"),
                                         _layer_range(swhere, src.get("layer_range"))))
            lengths = {s.layer_range[1] - s.layer_range[0] for s in parsed}
            if len(lengths) > 1:
                raise RecipeError(f"{where}: all sources of a slice must have the same number of layers "
                                  f"(got {sorted(lengths)}); adjust their layer_range")
            slice_base = ref(entry["base_model"], f"{where}.base_model") if entry.get("base_model") else None
            slices.append(Slice(tuple(parsed), slice_base, params(f"{where}.parameters",
                                                                   entry.get("parameters"), "slice")))
    top = params("parameters", data.get("parameters"), "top")

    dtype = _dtype(data, "dtype")
    out_dtype = _dtype(data, "out_dtype")
    tokenizer_source = _tokenizer_source(data, ref, warnings)
    pad = data["tokenizer"].get("pad_to_multiple_of") if isinstance(data.get("tokenizer"), dict) else None
    tokens = parse_tokens(data["tokenizer"].get("tokens"), ref, warnings) if isinstance(data.get("tokenizer"), dict) \
        else ()
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise RecipeError(f"tokenizer.pad_to_multiple_of must be a positive whole number, like 64, not '{_short(pad)}'")
    chat_template = data.get("chat_template")
    names = (*NAMED_CHAT_TEMPLATES, "auto")
    if chat_template is not None and (not isinstance(chat_template, str) or (
            chat_template not in names and "{{" not in chat_template and "{%" not in chat_template)):
        raise RecipeError(f"chat_template '{_short(chat_template)}' is neither a template name ({', '.join(names)})"
                          f"{_suggest(str(chat_template), names)} nor a Jinja template string")
    if isinstance(data.get("name"), (dict, list)):
        raise RecipeError("name must be a string")

    recipe = Recipe(method.name, base, tuple(models), tuple(slices) if slices is not None else None,
                    top, dtype, out_dtype, tokenizer_source, chat_template, text, tuple(warnings), pad, tokens)
    if len(recipe.referenced_models()) > MAX_MODELS:
        raise RecipeError(f"the recipe names {len(recipe.referenced_models())} different models; at most "
                          f"{MAX_MODELS} can be merged in one recipe")
    _validate_structure(recipe, method)
    check_token_models(tokens, recipe.merged_models())
    return recipe


def _layer_range(where: str, value: Any) -> tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise RecipeError(f"{where}.layer_range must be two integers [start, end), e.g. [0, 16]")
    start, end = value
    if start < 0 or end <= start:
        raise RecipeError(f"{where}.layer_range [{start}, {end}] is empty or negative; "
                          "use [start, end) with 0 <= start < end")
    return int(start), int(end)


def _dtype(data: dict, key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in DTYPES:
        raise RecipeError(f"{key} '{_short(value)}' is not supported{_suggest(str(value), DTYPES)}; "
                          "use float16, bfloat16 or float32")
    return DTYPES[value.lower()]


def _tokenizer_source(data: dict, ref: Any, warnings: list[str]) -> str | ModelRef | None:
    if data.get("tokenizer_source") is not None and data.get("tokenizer") is not None:
        raise RecipeError("give either tokenizer_source or tokenizer, not both")
    value = data.get("tokenizer_source")
    if data.get("tokenizer") is not None:
        tokenizer = compat.known_keys("tokenizer", data["tokenizer"], TOKENIZER_KEYS, warnings)
        value = tokenizer.get("source", "union")  # mergekit's default source
    if value is None:
        return None
    if value == "union":
        return "union"
    if value == "base":
        if data.get("base_model") is None and not any(
                isinstance(s, dict) and s.get("base_model") for s in data.get("slices") or []):
            raise RecipeError("tokenizer_source: base needs a base_model; add one or name a model")
        return "base"
    return ref(value, "tokenizer_source")


def _validate_structure(recipe: Recipe, method: Any) -> None:
    """Checks that need the whole recipe: base model policy, model counts, weights summing to zero."""
    groups: list[tuple[str, list[InputModel], ModelRef | None]] = []
    if recipe.slices is None:
        inputs = list(recipe.models)
        if recipe.base_model and all(m.model != recipe.base_model for m in inputs):
            inputs.append(InputModel(recipe.base_model))
        groups.append(("models", inputs, recipe.base_model))
    else:
        for i, s in enumerate(recipe.slices):
            groups.append((f"slices[{i}]", list(s.sources), s.base_model or recipe.base_model))
    for where, inputs, base in groups:
        if method.base == "required" and base is None:
            raise RecipeError(f"{method.name} needs a base_model (the model the others were fine-tuned "
                              "from); add 'base_model: org/name'")
        if method.base != "ignored" and base is not None and all(m.model != base for m in inputs) \
                and recipe.slices is not None:
            raise RecipeError(f"{where}: the base model {base} is not among the slice's sources; add it there")
        problem = method.check_inputs(len(inputs), base is not None)
        if problem:
            raise RecipeError(f"{where}: {problem}")
        if method.name in ("slerp", "nearswap") and base is not None and all(m.model != base for m in inputs):
            raise RecipeError(f"{method.name} interpolates from the base model; make {base} one of the two models")
        _check_required(where, inputs, base, recipe, method)
        _check_weight_sum(where, inputs, base, recipe, method)


def _check_required(where: str, inputs: list[InputModel], base: ModelRef | None, recipe: Recipe,
                    method: Any) -> None:
    """A parameter without a default must be set for every input that takes it, at some level."""
    slice_params = next((s.params for s in recipe.slices or () if list(s.sources) == inputs), {})
    shared_scopes = (slice_params, recipe.params)
    for param in method.params:
        if not param.required:
            continue
        if not param.per_model:
            if not any(param.name in scope for scope in shared_scopes):
                raise RecipeError(f"{method.name} needs '{param.name}'; set it under 'parameters:'")
            continue
        for m in inputs:
            takes = not (param.non_base and method.base != "ignored" and m.model == base)
            if takes and param.name not in m.params and not any(param.name in scope for scope in shared_scopes):
                raise RecipeError(f"{where}: {m.model} has no '{param.name}'; set it under that model's "
                                  "'parameters:' or at the top level")


def _check_weight_sum(where: str, inputs: list[InputModel], base: ModelRef | None,
                      recipe: Recipe, method: Any) -> None:
    """Refuse scalar weights that sum to zero where the method divides by their sum."""
    params = {p.name: p for p in method.params}
    if "weight" not in params or "normalize" not in params:
        return
    normalize = recipe.params.get("normalize", params["normalize"].default)
    if not _is_scalar(normalize) or not coerce(normalize, bool):
        return
    weights = []
    for m in inputs:
        if m.model == base and params["weight"].non_base:
            continue
        value = m.params.get("weight", recipe.params.get("weight", params["weight"].default))
        if not _is_scalar(value) or isinstance(value, str) and not _numeric(value):
            return
        weights.append(coerce(value, float))
    if weights and abs(sum(weights)) < 1e-8:
        raise RecipeError(f"{where}: the weights sum to zero and {method.name} divides by their sum; "
                          "change a weight or set 'normalize: false'")


def _numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def load_recipe(path: str | Path, *, allow_local: bool = True) -> Recipe:
    """Read and parse a recipe file; relative local model paths resolve against the file's folder."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{p} is larger than {MAX_RECIPE_BYTES // 1024} KiB; "
                              "a merge recipe is a few lines of YAML")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file {p} does not exist; check the path") from None
    except IsADirectoryError:
        raise RecipeError(f"{p} is a folder; give the path of a .yml recipe file") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{p} is not UTF-8 text; save the recipe as plain YAML") from None
    except OSError as e:
        raise RecipeError(f"cannot read {p}: {e.strerror}") from None
    return parse_recipe(text, allow_local=allow_local, base_dir=p.parent)


# ---------------------------------------------------------------- resolution

def evaluate_setting(setting: Any, tensor_name: str, t: float, kind: type) -> Any:
    """One setting -> a value for this tensor at layer position t (None when no condition matches).

    Gradients interpolate piecewise-linearly over t in [0, 1]; non-numeric lists pick a step.
    Conditions are substring filters, first match wins, a missing filter (or '*') matches all.
    """
    if _is_scalar(setting):
        return coerce(setting, kind)
    if isinstance(setting, dict):
        setting = [setting]
    if not setting:
        return None
    if all(_is_scalar(v) for v in setting):
        values = [coerce(v, kind) for v in setting]
        if kind not in (int, float):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return coerce((1 - frac) * values[i0] + frac * values[i1], kind)
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t, kind)
    return None


def resolve_parameter(param: Any, scopes: Iterable[Mapping[str, Any] | None], tensor_name: str,
                      t: float) -> Any:
    """First scope (highest precedence first) whose setting yields a value; else the default."""
    filtered = False
    for scope in scopes:
        if scope and param.name in scope:
            value = evaluate_setting(scope[param.name], tensor_name, t, param.kind)
            if value is not None:
                return value
            filtered = True
    if param.required:
        if filtered:
            raise RecipeError(f"parameter '{param.name}' has no value for tensor {tensor_name}: none of its "
                              "filters matches that name; end its list with a fallback entry such as "
                              "'- value: 0.5' (mergekit fails on this tensor too)")
        raise RecipeError(f"parameter '{param.name}' has no value for tensor {tensor_name}; "
                          "set it per model or at the top level")
    return param.default
