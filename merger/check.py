"""Pre-flight check: everything that can be known about a merge before a single weight byte is fetched.

It reads config.json and safetensors headers only, and reports every problem at once (not the first),
each with what to do about it, plus download, disk and memory estimates. The mistakes it exists for
are the ones mergekit users meet 20 minutes into a download: different architectures or layer counts,
a legacy Phi-2 layout, a vocab of 32000 vs 32002, a tensor missing in one model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping

import torch

from . import architecture as arch
from .architecture import ModelInfo, TensorRef
from .budget import MemoryNeed, default_budget, memory_needed
from .card import ParentInfo, license_conflict, local_license
from .errors import MergerError
from .recipe import InputModel, ModelRef, Recipe

ERROR, WARNING, NOTE = "error", "warning", "note"
MAX_LISTED = 5  # per kind of tensor problem; the rest are counted

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# Approximate bits per weight of llama.cpp's types (block scales included), for size estimates only.
GGUF_BITS = {"F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.7, "Q5_K_S": 5.54,
             "Q5_1": 6.0, "Q5_0": 5.5, "Q4_K_M": 4.85, "Q4_K_S": 4.58, "Q4_1": 5.0, "Q4_0": 4.5,
             "IQ4_XS": 4.25, "Q3_K_L": 4.27, "Q3_K_M": 3.91, "Q3_K_S": 3.5, "Q2_K": 3.35}
FLOAT_GGUF = ("F32", "F16", "BF16")
GGUF_WORK_BUFFERS = 3  # fp32 tensor, its converted copy, the quantizer's scratch


@dataclass(frozen=True)
class Problem:
    """One finding: `error` stops the merge, `warning` changes the result, `note` is for information."""

    severity: str
    message: str
    fix: str = ""


@dataclass(frozen=True)
class Inspection:
    """What an inspector returns for one model reference."""

    info: ModelInfo
    access: str = "local"  # e.g. "public", "gated (granted)", "private", "local"
    license: str | None = None


Inspector = Callable[[ModelRef], Inspection]


@dataclass(frozen=True)
class Estimates:
    """Bytes the job will need; memory stays flat in model size because tensors stream one by one."""

    download_bytes: int
    output_bytes: int
    gguf_bytes: int
    disk_bytes: int
    merge_ram_bytes: int
    gguf_ram_bytes: int
    merge_vram_bytes: int = 0  # the same merge on a GPU, at the same budget


@dataclass
class CheckReport:
    """The result of a check: models as inspected, every problem found, and the resource estimates."""

    recipe: Recipe
    models: dict[ModelRef, ModelInfo]
    access: dict[ModelRef, str]
    licenses: dict[ModelRef, str | None]
    problems: list[Problem]
    estimates: Estimates | None
    gguf_types: tuple[str, ...] = ()
    stream: bool = False  # the parents will be read from the Hub while merging, not downloaded

    @property
    def ok(self) -> bool:
        return not any(p.severity == ERROR for p in self.problems)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "method": self.recipe.method,
            "models": [{"ref": str(ref), "access": self.access.get(ref), "license": self.licenses.get(ref),
                        **_info_dict(info)} for ref, info in self.models.items()],
            "problems": [{"severity": p.severity, "message": p.message, "fix": p.fix} for p in self.problems],
            "estimates": vars(self.estimates) if self.estimates else None,
            "gguf_types": list(self.gguf_types),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def to_text(self) -> str:
        lines = [f"Check of a {self.recipe.method} merge of {len(self.models)} model(s): "
                 + ("OK" if self.ok else "NOT MERGEABLE"), ""]
        if self.models:
            lines += _table(self)
        if self.problems:
            lines += ["", "Problems:"]
            for p in sorted(self.problems, key=lambda p: (ERROR, WARNING, NOTE).index(p.severity)):
                lines.append(f"  [{p.severity}] {p.message}")
                if p.fix:
                    lines.append(f"      fix: {p.fix}")
        if self.estimates:
            e = self.estimates
            lines += ["", "Estimates:",
                      f"  download        {_bytes(e.download_bytes)}",
                      f"  merged output   {_bytes(e.output_bytes)}",
                      f"  disk (peak)     {_bytes(e.disk_bytes)}",
                      f"  RAM, merge      {_bytes(e.merge_ram_bytes)}",
                      f"  VRAM, on a GPU  {_bytes(e.merge_vram_bytes)}"]
            if self.gguf_types:
                kinds = ", ".join(self.gguf_types)
                if any(t not in FLOAT_GGUF for t in self.gguf_types) and "F16" not in self.gguf_types:
                    kinds += ", and the F16 file they are quantized from"
                lines += [f"  GGUF files      {_bytes(e.gguf_bytes)} ({kinds})",
                          f"  RAM, GGUF step  {_bytes(e.gguf_ram_bytes)}"]
        return "\n".join(lines)


def _info_dict(info: ModelInfo) -> dict[str, Any]:
    return {"architecture": info.architecture, "model_type": info.model_type, "layers": info.num_layers,
            "hidden_size": info.hidden_size, "vocab_size": info.vocab_size, "embedding_rows": info.embedding_rows,
            "tie_word_embeddings": info.tie_word_embeddings, "dtype": info.dtype, "parameters": info.param_count,
            "size_bytes": info.size_bytes, "layout": info.layout, "remote_code": info.remote_code}


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _table(report: CheckReport) -> list[str]:
    rows: list[tuple[str, list[str]]] = [("model", [str(r) for r in report.models])]
    infos = list(report.models.values())
    fields: tuple[tuple[str, Callable[[ModelInfo], Any]], ...] = (
        ("architecture", lambda i: i.architecture), ("model_type", lambda i: i.model_type),
        ("layers", lambda i: i.num_layers), ("hidden size", lambda i: i.hidden_size),
        ("vocab (config / rows)", lambda i: f"{i.vocab_size} / {i.embedding_rows}"),
        ("tied embeddings", lambda i: "yes" if i.tie_word_embeddings else "no"), ("dtype", lambda i: i.dtype),
        ("parameters", lambda i: _count(i.param_count)), ("size on disk", lambda i: _bytes(i.size_bytes)),
        ("layout", lambda i: i.layout))
    rows += [(label, [str(get(i)) for i in infos]) for label, get in fields]
    rows.append(("access", [report.access.get(r, "") for r in report.models]))
    label_w = max(len(label) for label, _ in rows)
    col_w = [max(len(values[c]) for _, values in rows) for c in range(len(infos))]
    return ["  " + label.ljust(label_w) + "  " + "  ".join(v.ljust(w) for v, w in zip(values, col_w)).rstrip()
            for label, values in rows]


# ---------------------------------------------------------------- inspection

def default_inspector(*, token: str | None = None, allow_bin: bool = False) -> Inspector:
    """Local folders through their headers, Hub repos through header-only Hub reads."""
    def inspect(ref: ModelRef) -> Inspection:
        if ref.lora is not None:
            return _with_adapter(ref, inspect(ref.model), token)
        if ref.local:
            info = arch.inspect_local(ref.repo, ref=ref, allow_bin=allow_bin, check_size=False)
            return Inspection(info, "local", local_license(ref.repo))
        from .hub import fetch_model_metadata

        config, headers, access, license_ = fetch_model_metadata(ref, token)
        return Inspection(arch.model_info_from(config, headers, ref), access, license_)
    return inspect


def inspect_all(refs: Iterable[ModelRef], inspect: Inspector, problems: list[Problem]
                ) -> tuple[dict[ModelRef, ModelInfo], dict[ModelRef, str], dict[ModelRef, str | None]]:
    """Each model's info, access and licence; a model that cannot be read, and each model's own problems,
    are appended to `problems` (merge recipes and MoE configs alike)."""
    models: dict[ModelRef, ModelInfo] = {}
    access: dict[ModelRef, str] = {}
    licenses: dict[ModelRef, str | None] = {}
    for ref in refs:
        try:
            found = inspect(ref)
        except MergerError as e:
            problems.append(Problem(ERROR, f"{ref}: {e}"))
            continue
        models[ref], access[ref], licenses[ref] = found.info, found.access, found.license
        problems += _model_problems(found.info)
    return models, access, licenses


def _with_adapter(ref: ModelRef, found: Inspection, token: str | None) -> Inspection:
    """A `model+lora` reference: the model as inspected, once its adapter (config and header only) is
    known to fit it; ModelError otherwise."""
    from .lora import adapter_problems, load_local_adapter, read_adapter, stored_shapes

    assert ref.lora is not None
    if ref.lora.local:
        adapter = load_local_adapter(ref.lora.repo, ref.lora.display_name)
    else:
        from .hub import adapter_metadata

        config, headers = adapter_metadata(ref.lora, token)
        adapter = read_adapter(config, headers, str(ref.lora))
    problems = adapter_problems(adapter, stored_shapes(found.info.tensors))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MergerError(problems[0] + more)
    return replace(found, info=replace(found.info, ref=ref))


# ---------------------------------------------------------------- the check

def check_recipe(recipe: Recipe, *, inspect: Inspector | None = None, token: str | None = None,
                 gguf_types: Iterable[str] | None = None, allow_bin: bool = False,
                 max_memory: int | None = None, strict: bool = False) -> CheckReport:
    """Every problem of this recipe with these models, found from metadata alone; memory estimates at
    the budget `max_memory` (default: this machine's, see merger.budget).

    The recipe's warnings (keys mergekit ignores) come first; `strict` makes them errors.
    """
    inspect = inspect or default_inspector(token=token, allow_bin=allow_bin)
    problems: list[Problem] = [Problem(ERROR if strict else WARNING, w) for w in recipe.warnings]
    gguf = tuple(t.upper() for t in gguf_types or ())
    groups = _groups(recipe)
    problems += _method_problems(recipe, groups)

    models, access, licenses = inspect_all(recipe.referenced_models(), inspect, problems)

    problems += _architecture_problems(list(models.values()))
    if not any(p.severity == ERROR and "cannot be merged with" in p.message for p in problems):
        problems += _structure_problems(recipe, groups, models)
    problems += _tokenizer_problems(recipe, groups, models)
    if not any(p.severity == ERROR for p in problems):
        problems += _parameter_problems(recipe, models)
    conflict = license_conflict([ParentInfo(str(ref), None, lic) for ref, lic in licenses.items() if lic])
    if conflict:
        problems.append(Problem(WARNING, conflict, "check that the licences allow merging and redistribution; "
                                "the card will carry the most restrictive one"))
    reference = _reference(groups)
    if gguf and reference in models:
        problems += _gguf_problems(models[reference])
    estimates = _estimates(recipe, groups, models, gguf, max_memory) if reference in models else None
    unique = list(dict.fromkeys(problems))
    return CheckReport(recipe, models, access, licenses, unique, estimates, gguf)


def _groups(recipe: Recipe) -> list[tuple[list[InputModel], ModelRef | None, str]]:
    """Inputs of each merge group (slice), base included, as the engine will see them."""
    if recipe.slices is None:
        inputs = list(recipe.models)
        if recipe.base_model and all(m.model != recipe.base_model for m in inputs):
            inputs.append(InputModel(recipe.base_model))
        return [(inputs, recipe.base_model, "models")]
    return [(list(s.sources), s.base_model or recipe.base_model, f"slices[{i}]")
            for i, s in enumerate(recipe.slices)]


def _reference(groups: list[tuple[list[InputModel], ModelRef | None, str]]) -> ModelRef | None:
    inputs, base, _ = groups[0]
    return base or (inputs[0].model if inputs else None)


def _method_problems(recipe: Recipe, groups: list[tuple[list[InputModel], ModelRef | None, str]]) -> list[Problem]:
    from .methods import get_method

    try:
        method = get_method(recipe.method)
    except MergerError as e:
        return [Problem(ERROR, str(e))]
    out = []
    for inputs, base, where in groups:
        count = len(inputs)
        if method.base == "required" and base is None:
            out.append(Problem(ERROR, f"{method.name} needs a base model and {where} has none",
                               "add 'base_model: org/name' (the model the others were fine-tuned from)"))
        if method.min_models == method.max_models and count != method.min_models:
            out.append(Problem(ERROR, f"{method.name} merges exactly {method.min_models} models (base included); "
                                      f"{where} has {count}",
                               f"list exactly {method.min_models} models, or use linear or ties for more"))
        elif count < method.min_models:
            out.append(Problem(ERROR, f"{method.name} needs at least {method.min_models} models (base included); "
                                      f"{where} has {count}", "add models to the recipe"))
        elif method.max_models is not None and count > method.max_models:
            out.append(Problem(ERROR, f"{method.name} takes at most {method.max_models} models (base included); "
                                      f"{where} has {count}", "remove models or split them into slices"))
    return out


def _model_problems(info: ModelInfo) -> list[Problem]:
    out = []
    name = info.name
    if info.converted:
        out.append(Problem(NOTE, f"{name} is converted from the legacy phi-msft layout (transformer.h.N.mixer.Wqkv) "
                                 "to the phi layout (q/k/v_proj); its remote code is not used"))
    elif info.remote_code and info.family is not None:
        out.append(Problem(NOTE, f"{name} has auto_map (remote code) in its config; it is ignored and transformers' "
                                 f"native {info.architecture} is used"))
    elif info.remote_code:
        out.append(Problem(ERROR, f"{name} needs remote code ({info.architecture}, auto_map in config.json); "
                                  "remote code is never executed here",
                           "use a version of the model in an architecture transformers supports natively"))
    if info.family is None and not info.remote_code:
        out.append(Problem(NOTE, f"{name}: architecture {info.architecture} is not in the family tables; tensors "
                                 "are matched by name and shape from the headers"))
    if info.missing:
        out.append(Problem(ERROR, f"{_listing(info.missing)} {'is' if len(info.missing) == 1 else 'are'} "
                                  f"missing in {name}", "the checkpoint is incomplete or of another variant; "
                                                        "use a complete upload of the model"))
    if info.unexpected:
        out.append(Problem(WARNING, f"{name} has tensors the {info.family.name if info.family else ''} table "
                                    f"does not list: {_listing(info.unexpected)}; they are merged by name"))
    if info.vocab_size is not None and info.embedding_rows is not None and info.vocab_size != info.embedding_rows:
        out.append(Problem(NOTE, f"{name}: config vocab_size is {info.vocab_size} but the embedding has "
                                 f"{info.embedding_rows} rows; the rows are what is merged"))
    embedding = info.tensors.get(info.family.embedding) if info.family else None
    if embedding is not None and info.hidden_size and len(embedding.shape) == 2 \
            and embedding.shape[1] != info.hidden_size:
        out.append(Problem(ERROR, f"{name}: config hidden_size is {info.hidden_size} but {info.family.embedding} "
                                  f"is {embedding.shape[1]} wide; the config does not match the weights",
                           "use the config.json that came with the weights"))
    if any(f.endswith(".bin") for f in info.files):
        out.append(Problem(NOTE, f"{name} has pickle .bin weights; they are read with torch's weights-only loader"))
    return out


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" (and {len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


def _architecture_problems(infos: list[ModelInfo]) -> list[Problem]:
    if not infos:
        return []
    first = infos[0]
    return [Problem(ERROR, f"{i.architecture} ({i.name}) cannot be merged with {first.architecture} ({first.name})",
                    "merge models of one architecture; fine-tunes of the same base model")
            for i in infos[1:] if i.architecture != first.architecture]


def _structure_problems(recipe: Recipe, groups: list[tuple[list[InputModel], ModelRef | None, str]],
                        models: Mapping[ModelRef, ModelInfo]) -> list[Problem]:
    """Layer counts and ranges, then tensor names and shapes compared layer by layer."""
    out: list[Problem] = []
    views: list[dict[ModelRef, dict[str, TensorRef]]] = []
    for inputs, _, where in groups:
        known = [m for m in inputs if m.model in models]
        if recipe.slices is None:
            counts = {models[m.model].num_layers for m in known}
            if len(counts) > 1:
                detail = ", ".join(f"{m.model}: {models[m.model].num_layers}" for m in known)
                out.append(Problem(ERROR, f"the models have different layer counts ({detail})",
                                   "use 'slices:' with a layer_range per model to choose which layers to merge"))
                continue
        ranges = {}
        for m in known:
            n = models[m.model].num_layers
            start, end = m.layer_range or (0, n)
            if not 0 <= start < end <= n:
                out.append(Problem(ERROR, f"{where}: layer_range [{start}, {end}] of {m.model} is out of bounds; "
                                          f"it has {n} layers", f"use 0 <= start < end <= {n}"))
                continue
            ranges[m.model] = (start, end)
        if len({e - s for s, e in ranges.values()}) > 1:
            detail = ", ".join(f"{ref}: {list(r)}" for ref, r in ranges.items())
            out.append(Problem(ERROR, f"{where}: the layer ranges have different lengths ({detail})",
                               "give every source of a slice the same number of layers"))
            continue
        views.append({ref: _relative(models[ref], start, end) for ref, (start, end) in ranges.items()})
    out += _tensor_problems(views, models)
    return out


def _relative(info: ModelInfo, start: int, end: int) -> dict[str, TensorRef]:
    """Tensors of a layer range, renumbered from 0, plus the non-layer tensors."""
    out = {}
    for name, ref in info.tensors.items():
        i = arch.layer_index(name)
        if i is None:
            out[name] = ref
        elif start <= i < end:
            out[arch.rename_layer(name, i - start)] = ref
    return out


def _tensor_problems(views: list[dict[ModelRef, dict[str, TensorRef]]],
                     models: Mapping[ModelRef, ModelInfo]) -> list[Problem]:
    missing: dict[tuple[str, ModelRef], ModelRef] = {}
    shapes: dict[str, str] = {}
    for view in views:
        refs = list(view)
        for name in sorted({n for tensors in view.values() for n in tensors}):
            have = [r for r in refs if name in view[r]]
            for r in refs:
                if name not in view[r] and not (models[r].tie_word_embeddings and arch.is_embedding(models[r], name)):
                    missing.setdefault((name, r), have[0])
            first = view[have[0]][name]
            for r in have[1:]:
                other = view[r][name]
                embedding = arch.is_embedding(models[r], name)
                if other.shape != first.shape and not (embedding and other.shape[1:] == first.shape[1:]):
                    shapes.setdefault(name, f"{name} has shape {list(first.shape)} in {have[0]} but "
                                            f"{list(other.shape)} in {r}")
    out = []
    by_model: dict[tuple[ModelRef, ModelRef], list[str]] = {}
    for (name, r), present_in in missing.items():
        by_model.setdefault((r, present_in), []).append(name)
    for (r, present_in), names in by_model.items():
        out.append(Problem(ERROR, f"{_listing(names)} {'is' if len(names) == 1 else 'are'} missing in {r} "
                                  f"(present in {present_in})",
                           "these models are not the same architecture variant; merge fine-tunes of one base"))
    if shapes:
        listed = list(shapes.values())
        out.append(Problem(ERROR, "shape mismatch: " + "; ".join(listed[:MAX_LISTED])
                           + (f" (and {len(listed) - MAX_LISTED} more)" if len(listed) > MAX_LISTED else ""),
                           "the models differ in size; merge models of the same size (same hidden and "
                           "intermediate sizes and heads)"))
    return out


def _tokenizer_problems(recipe: Recipe, groups: list[tuple[list[InputModel], ModelRef | None, str]],
                        models: Mapping[ModelRef, ModelInfo]) -> list[Problem]:
    merged = [m.model for inputs, _, _ in groups for m in inputs]
    source = recipe.tokenizer_source
    out = []
    if isinstance(source, ModelRef) and source not in merged:
        out.append(Problem(ERROR, f"tokenizer_source {source} is not one of the merged models",
                           "name one of the models listed in the recipe, or 'base'"))
    rows = {ref: models[ref].embedding_rows for ref in dict.fromkeys(merged)
            if ref in models and models[ref].embedding_rows is not None}
    if len(set(rows.values())) > 1:
        detail = ", ".join(f"{ref}: {n}" for ref, n in rows.items())
        common = min(rows.values())
        if source is None:
            keep = recipe.base_model or max(rows, key=rows.get)
            out.append(Problem(ERROR, f"vocab sizes differ ({detail}) and the recipe has no tokenizer setting; "
                                      "mergekit 0.1.5 refuses this too (cropping to the "
                                      f"{common} rows common to all would silently drop tokens)",
                               f"add 'tokenizer_source: {'base' if recipe.base_model else keep}' to keep the "
                               f"tokenizer of {keep}: the embeddings are rebuilt for it, rows of tokens the "
                               "models share are merged and its own tokens keep their embedding"))
        else:
            target = "the union of the models' tokenizers" if source == "union" else f"the tokenizer of {source}"
            out.append(Problem(NOTE, f"vocab sizes differ ({detail}); the embeddings are rebuilt for {target}"))
    return out


def _parameter_problems(recipe: Recipe, models: Mapping[ModelRef, ModelInfo]) -> list[Problem]:
    """Resolve every parameter of every planned tensor now, as the merge will: a required value that
    only filters give (`t: [{filter: self_attn, value: 0.5}]`) or values that clash fail here, not
    after the download. One problem per parameter or clash, naming the first tensor it hits."""
    from .engine import output_parameters, plan_merge

    try:  # without the tokenizer setting: embedding rows do not change which values a tensor gets
        plan = plan_merge(replace(recipe, tokenizer_source=None), models)
    except MergerError:
        return []  # the same cause is reported by the structure checks
    found: dict[str, Problem] = {}
    for out in plan.outputs:
        try:
            shared, per_model = output_parameters(plan.method, recipe, out)
        except MergerError as e:
            key = str(e).split(" has no value")[0]
            found.setdefault(key, Problem(ERROR, str(e)))
            continue
        for i, values in enumerate(per_model):
            clash = plan.method.check_values({**shared, **values}) if i != out.base_index else None
            if clash:
                found.setdefault(clash, Problem(ERROR, f"{clash} (tensor {out.name} of {out.sources[i].model})",
                                                "adjust the recipe's parameters"))
    return list(found.values())


def _gguf_problems(info: ModelInfo) -> list[Problem]:
    try:
        from quantize.convert import check_convertible
    except ImportError:
        return [Problem(WARNING, "GGUF export is not available in this installation (no quantize package)",
                        "install the project with its GGUF extra, or drop the GGUF step")]
    reason = check_convertible(info.config)
    return [Problem(ERROR, f"GGUF export: {reason}", "drop the GGUF step; the merged safetensors still work")] \
        if reason else []


def merge_memory(recipe: Recipe, models: Mapping[ModelRef, ModelInfo], *, budget: int | None,
                 cuda: bool = False, gguf: bool = False) -> MemoryNeed:
    """RAM and VRAM the merge of `recipe` needs at a memory budget (None: whole tensors at once), from
    the models' headers: the process's base plus one block of the largest tensor (see merger.budget).
    For choosing hardware: the need stops growing with the model once the budget is below it."""
    from .methods import METHODS

    groups = _groups(recipe)
    method = METHODS.get(recipe.method, METHODS["linear"])
    largest = max((t.numel for info in models.values() for t in info.tensors.values()), default=0)
    inputs = max((len(inputs) for inputs, _, _ in groups), default=1)
    reference = models.get(_reference(groups)) or next(iter(models.values()), None)
    stored = DTYPE_BYTES.get(reference.dtype if reference else "", 2)
    out = DTYPE_BYTES.get(recipe.output_dtype or (reference.dtype if reference else "") or "float16", 2)
    return memory_needed(method, inputs, largest, budget=budget, stored_bytes=stored, out_bytes=out, cuda=cuda,
                         whole_tensor_sinks=gguf)


def _estimates(recipe: Recipe, groups: list[tuple[list[InputModel], ModelRef | None, str]],
               models: Mapping[ModelRef, ModelInfo], gguf: tuple[str, ...], max_memory: int | None) -> Estimates:
    reference = models[_reference(groups)]
    download = sum(info.size_bytes for ref, info in models.items() if not ref.local)
    params = sum(t.numel for name, t in reference.tensors.items() if arch.layer_index(name) is None)
    for inputs, _, _ in groups:
        first = next((m for m in inputs if m.model in models), None)
        if first is not None:
            layers = _layer_params(models[first.model])
            start, end = first.layer_range or (0, len(layers))
            params += sum(layers[start:end])
    out_dtype = recipe.output_dtype or reference.dtype or "float16"
    output = params * DTYPE_BYTES.get(out_dtype, 2)
    gguf_files = list(gguf)
    if any(t not in FLOAT_GGUF for t in gguf) and "F16" not in gguf:
        gguf_files.append("F16")  # llama.cpp quantizes from an intermediate F16 file
    gguf_bytes = int(sum(params * GGUF_BITS.get(t, 16.0) / 8 for t in gguf_files))
    largest = max((t.numel for info in models.values() for t in info.tensors.values()), default=0)
    budget = max_memory if max_memory is not None else default_budget(torch.device("cpu"))
    return Estimates(
        download_bytes=download, output_bytes=output, gguf_bytes=gguf_bytes,
        disk_bytes=download + output + gguf_bytes,
        merge_ram_bytes=merge_memory(recipe, models, budget=budget, gguf=bool(gguf)).ram_bytes,
        gguf_ram_bytes=largest * 4 * GGUF_WORK_BUFFERS if gguf else 0,
        merge_vram_bytes=merge_memory(recipe, models, budget=max_memory, cuda=True).vram_bytes,
    )


def _layer_params(info: ModelInfo) -> list[int]:
    counts = [0] * info.num_layers
    for name, t in info.tensors.items():
        i = arch.layer_index(name)
        if i is not None and i < info.num_layers:
            counts[i] += t.numel
    return counts
