"""The model card of a merge: lineage, method, recipe, licence, GGUF files, usage, how to reproduce it.

Built with huggingface_hub's ModelCard/ModelCardData so the front matter is what the Hub expects
(base_model + base_model_relation: merge, license, tags); it passes the Hub's metadata validation.
The card also carries this tool's tag, which is how a later push recognises a repo it made.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from huggingface_hub import ModelCard, ModelCardData

from .methods import get_method
from .recipe import InputModel, ModelRef, Recipe

RECIPE_FILE = "mergekit_config.yml"
TOOL_TAG = "llm-merger"  # marks repos made by this tool (with RECIPE_FILE), so re-pushes may update them
EVAL_TASKS = ("arc_challenge", "hellaswag", "mmlu")

# What each method does, in one sentence (its paper and pretty name come from the method registry).
METHOD_SENTENCES: dict[str, str] = {
    "linear": "averages the models' parameters with the given weights (a model soup)",
    "slerp": "interpolates between two models along the arc of the hypersphere (spherical linear "
             "interpolation), tensor by tensor, with factor t",
    "nuslerp": "interpolates spherically with a weight per model, optionally on task vectors relative to a "
               "base model",
    "multislerp": "generalises spherical interpolation to more than two models (a weighted barycentre on the "
                  "hypersphere)",
    "karcher": "takes the Karcher (Riemannian) mean of the models' parameters on the hypersphere",
    "task_arithmetic": "adds the weighted task vectors (fine-tune minus base) of the models to the base model",
    "ties": "keeps the largest entries of each task vector (density), elects a sign per parameter and averages "
            "only the agreeing entries (TIES-Merging)",
    "dare_ties": "drops task-vector entries at random and rescales the rest (DARE), then elects signs as in TIES",
    "dare_linear": "drops task-vector entries at random and rescales the rest (DARE), then adds them linearly",
    "breadcrumbs": "removes both the largest outliers and the smallest entries of each task vector before "
                   "adding them (Model Breadcrumbs)",
    "breadcrumbs_ties": "sparsifies task vectors as Model Breadcrumbs does, then elects signs as in TIES",
    "della": "drops task-vector entries with probabilities that shrink with their magnitude (DELLA), then "
             "elects signs as in TIES",
    "della_linear": "drops task-vector entries with magnitude-aware probabilities (DELLA), then adds them "
                    "linearly",
    "sce": "selects the task-vector entries that vary most across models, weights them by their energy and "
           "erases sign conflicts (SCE)",
    "model_stock": "places the merged weights from the geometry of the fine-tuned models around the base "
                   "(Model Stock)",
    "nearswap": "takes the other model's parameters only where they are close to the base model's "
                "(within t)",
    "passthrough": "copies tensors unchanged; with slices it stacks layer ranges of several models into one "
                   "deeper model",
    "arcee_fusion": "keeps the base model's parameters except where the fine-tune's change is an outlier in "
                    "importance (change times the divergence of the row's softmax), which it takes over",
    "ram": "keeps each model's changes where it alone changed a parameter and averages the changes where "
           "several did (Reinforced Agent Merging)",
    "ramplus_tl": "merges as RAM does and boosts each model's unique changes by how much of its change the "
                  "others share, tensor by tensor (RAM+)",
}

# Licence families from least to most restrictive for someone publishing a derivative.
_LICENSE_RANKS: tuple[tuple[str, frozenset[str]], ...] = (
    ("permissive", frozenset("""apache-2.0 mit bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear isc zlib
        unlicense cc0-1.0 cc cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 afl-3.0 artistic-2.0 bsl-1.0 ecl-2.0
        postgresql ncsa wtfpl pddl odc-by cdla-permissive-1.0 cdla-permissive-2.0 ms-pl openmdw-1.0 apple-ascl
        etalab-2.0""".split())),
    ("share-alike", frozenset("""lgpl lgpl-2.1 lgpl-3.0 lgpl-lr mpl-2.0 epl-1.0 epl-2.0 eupl-1.1 eupl-1.2
        cc-by-sa-3.0 cc-by-sa-4.0 cdla-sharing-1.0 odbl osl-3.0 gfdl ofl-1.1 lppl-1.3c""".split())),
    ("copyleft", frozenset("gpl gpl-2.0 gpl-3.0 agpl-3.0".split())),
    ("use-restricted", frozenset("""openrail openrail++ bigscience-openrail-m creativeml-openrail-m
        bigscience-bloom-rail-1.0 bigcode-openrail-m""".split())),
    ("vendor", frozenset("""llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 gemma deepfloyd-if-license apple-amlr
        h-research intel-research c-uda""".split())),
    ("non-commercial", frozenset("""cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0
        cc-by-nc-sa-4.0 fair-noncommercial-research-license""".split())),
    ("no-derivatives", frozenset("cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0".split())),
    ("other", frozenset({"other"})),
)
_UNKNOWN_RANK = len(_LICENSE_RANKS)

# What each GGUF type is for, shown in the files table.
GGUF_USES: dict[str, str] = {
    "F32": "reference, lossless, largest",
    "F16": "full quality",
    "BF16": "full quality, for bf16-native hardware",
    "Q8_0": "near-lossless, half the size of F16",
    "Q6_K": "very close to F16",
    "Q5_K_M": "high quality, a good default if it fits",
    "Q5_K_S": "high quality, slightly smaller",
    "Q5_0": "legacy 5-bit",
    "Q4_K_M": "recommended balance of size and quality",
    "Q4_K_S": "smaller, slightly lower quality",
    "Q4_0": "legacy 4-bit, fast on CPUs",
    "Q3_K_M": "small, noticeable quality loss",
    "Q3_K_S": "smaller, more quality loss",
    "Q2_K": "smallest, large quality loss",
}
_GGUF_TYPE = re.compile(r"(?:^|[-_.])(" + "|".join(sorted(GGUF_USES, key=len, reverse=True)) + r")\.gguf$",
                        re.IGNORECASE)


@dataclass(frozen=True)
class ParentInfo:
    """A parent model as published: its pinned commit and declared licence (local folders: local=True)."""

    repo: str
    revision: str | None
    license: str | None
    license_name: str | None = None
    license_link: str | None = None
    local: bool = False


@dataclass(frozen=True)
class GGUFFileInfo:
    filename: str
    quant_type: str
    size_bytes: int

    @classmethod
    def from_path(cls, path: str | Path) -> "GGUFFileInfo":
        """Type from the file name's suffix (`name-Q4_K_M.gguf`), size from the file."""
        path = Path(path)
        match = _GGUF_TYPE.search(path.name)
        return cls(path.name, match.group(1).upper() if match else "GGUF", path.stat().st_size)


# ---------------------------------------------------------------- licences

def _rank(license_: str | None) -> int:
    for i, (_, names) in enumerate(_LICENSE_RANKS):
        if license_ in names:
            return i
    return _UNKNOWN_RANK


def _license_key(parent: ParentInfo) -> str:
    if parent.license == "other" and parent.license_name:
        return f"other ({parent.license_name})"
    return parent.license or "unknown"


def local_license(folder: str | Path) -> str | None:
    """A local model's licence from its README front matter (None when it has no card)."""
    readme = Path(folder) / "README.md"
    try:
        return ModelCard(readme.read_text(encoding="utf-8")).data.license if readme.is_file() else None
    except Exception:  # a malformed card is no reason to fail a merge
        return None


def merged_license(parents: Sequence[ParentInfo]) -> ParentInfo | None:
    """The parent whose licence binds the merge most: the most restrictive one, first on ties."""
    published = [p for p in parents if not p.local]
    if not published:
        return None
    return max(published, key=lambda p: (_rank(p.license), -published.index(p)))


def license_conflict(parents: Sequence[ParentInfo]) -> str | None:
    """One line when the parents' licences cannot simply be combined (for the check and the card)."""
    published = [p for p in parents if not p.local]
    issues = []
    unknown = [p.repo for p in published if _rank(p.license) == _UNKNOWN_RANK]
    if unknown:
        issues.append(f"{', '.join(unknown)} declare{'s' if len(unknown) == 1 else ''} no licence, so "
                      "the terms are unknown")
    no_derivatives = [p for p in published if _rank(p.license) == 6]
    if no_derivatives:
        issues.append(", ".join(f"{p.repo} ({p.license})" for p in no_derivatives) + " forbid derivatives, so "
                      "the merge may not be shareable")
    restrictive: dict[str, list[str]] = {}
    for p in published:
        if 0 < _rank(p.license) < _UNKNOWN_RANK:
            restrictive.setdefault(_license_key(p), []).append(p.repo)
    if len(restrictive) > 1:
        listed = "; ".join(f"{lic}: {', '.join(repos)}" for lic, repos in restrictive.items())
        issues.append(f"the parents' licences differ ({listed}) and the merge must satisfy all of them")
    if not issues:
        return None
    return "; ".join(issues) + "; check the licences before publishing"


# ---------------------------------------------------------------- the card

def build_card(recipe: Recipe, *, parents: Sequence[ParentInfo], output_name: str,
               gguf_files: Sequence[GGUFFileInfo] = (), gguf_repo: str | None = None,
               sanity: Mapping[str, Any] | None = None, seed: int | None = None) -> ModelCard:
    """The README.md of a merged model. `output_name` is its repo id (`user/name`) or a local name."""
    method = get_method(recipe.method)
    by_repo = {p.repo: p for p in parents}
    hub_parents = [p.repo for p in parents if not p.local]
    binding = merged_license(parents)
    license_, license_name, license_link = _license_fields(binding)
    tags = ["merge", "mergekit", TOOL_TAG, method.name] + (["gguf"] if gguf_files else [])
    data = ModelCardData(
        base_model=hub_parents or None, library_name="transformers", license=license_,
        license_name=license_name, license_link=license_link, pipeline_tag="text-generation", tags=tags)
    if hub_parents:
        data.base_model_relation = "merge"
    name = output_name.split("/")[-1]
    conflict = license_conflict(parents)
    sentence = METHOD_SENTENCES[method.name]
    body = [f"# {name}", "",
            f"A merge of {len(recipe.referenced_models())} pre-trained language models, made from a mergekit "
            f"recipe with the [{method.pretty_name}]({method.paper}) method, which {sentence}.", ""]
    if conflict:
        body += [f"> **Licence warning:** {conflict}.", ""]
    body += ["## Merged models", ""] + _parents_table(recipe, by_repo) + [""]
    settings = _settings_line(recipe)
    if settings:
        body += [settings, ""]
    body += ["## Recipe", "", f"The recipe, also in [`{RECIPE_FILE}`]({RECIPE_FILE}):", "", "```yaml",
             recipe.text.rstrip("\n"), "```", ""]
    if gguf_files:
        body += ["## GGUF files", ""] + _gguf_table(gguf_files, gguf_repo) + [""]
    body += ["## Usage", ""] + _usage(output_name, gguf_files, gguf_repo)
    if sanity:
        body += ["## Sanity checks", "", "| check | result |", "|---|---|"]
        body += [f"| {k} | {_cell(v)} |" for k, v in sanity.items()] + [""]
    body += ["## Evaluation", "", "Evaluate the merge with "
             "[lm-evaluation-harness](https://github.com/EleutherAI/lm-evaluation-harness):", "", "```bash",
             f"lm_eval --model hf --model_args pretrained={output_name},dtype=auto "
             f"--tasks {','.join(EVAL_TASKS)} --batch_size auto", "```", ""]
    seed_arg = f" --seed {seed}" if seed is not None and method.randomized else ""
    body += ["## Reproduce this merge", "", f"Download [`{RECIPE_FILE}`]({RECIPE_FILE}) and run:", "", "```bash",
             f"python -m merger run {RECIPE_FILE} OUT{seed_arg}", "```", ""]
    if any(p.revision for p in parents if not p.local):
        body += ["The parent revisions listed above are the exact commits that were merged; pin them as "
                 "`org/name@sha` in the recipe to get the same result after the parents change.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def build_gguf_card(model_card: ModelCard, *, model_repo: str, gguf_repo: str,
                    gguf_files: Sequence[GGUFFileInfo]) -> ModelCard:
    """The README.md of the `NAME-GGUF` repo: quantizations of the merged model, same licence."""
    main = model_card.data
    data = ModelCardData(base_model=model_repo, license=main.license, license_name=main.license_name,
                         license_link=main.license_link, library_name="gguf", pipeline_tag="text-generation",
                         tags=["gguf", "llama.cpp", "merge", TOOL_TAG])
    data.base_model_relation = "quantized"
    body = [f"# {gguf_repo.split('/')[-1]}", "",
            f"GGUF files of [{model_repo}](https://huggingface.co/{model_repo}) for llama.cpp and compatible "
            f"runtimes; its card has the merged models, the recipe and the licence.", "",
            "## Files", ""] + _gguf_table(gguf_files, gguf_repo) + ["", "## Usage", ""]
    body += _gguf_usage(gguf_files, gguf_repo)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def _license_fields(binding: ParentInfo | None) -> tuple[str, str | None, str | None]:
    if binding is None or binding.license is None:
        return "unknown", None, None
    if binding.license == "other":
        if not binding.license_name:
            return "unknown", None, None
        return "other", binding.license_name, binding.license_link
    return binding.license, None, None


def _parents_table(recipe: Recipe, by_repo: Mapping[str, ParentInfo]) -> list[str]:
    if recipe.slices is None:
        inputs = list(recipe.models)
        if recipe.base_model and all(m.model != recipe.base_model for m in inputs):
            inputs.insert(0, InputModel(recipe.base_model))
        rows = ["| model | revision | role | parameters |", "|---|---|---|---|"]
        for m in inputs:
            role = "base" if m.model == recipe.base_model else "merged"
            rows.append(f"| {_model_link(m.model)} | {_revision(m.model, by_repo)} | {role} | {_params(m.params)} |")
        return rows
    rows = ["| slice | model | revision | layers | parameters |", "|---|---|---|---|---|"]
    for i, s in enumerate(recipe.slices):
        base = s.base_model or recipe.base_model
        for m in s.sources:
            start, end = m.layer_range or (0, 0)
            role = " (base)" if m.model == base else ""
            rows.append(f"| {i} | {_model_link(m.model)}{role} | {_revision(m.model, by_repo)} | {start}-{end - 1} | "
                        f"{_params({**s.params, **m.params})} |")
    return rows


def _settings_line(recipe: Recipe) -> str:
    parts = [f"{k}: {_value(v)}" for k, v in recipe.params.items()]
    if recipe.dtype:
        parts.append(f"dtype: {recipe.dtype}")
    if recipe.out_dtype:
        parts.append(f"out_dtype: {recipe.out_dtype}")
    if isinstance(recipe.tokenizer_source, ModelRef):
        parts.append(f"tokenizer from: {recipe.tokenizer_source.display_name}")
    elif recipe.tokenizer_source:
        parts.append(f"tokenizer from: {recipe.tokenizer_source}")
    if recipe.chat_template:
        template = recipe.chat_template if "\n" not in recipe.chat_template else "custom"
        parts.append(f"chat template: {template}")
    return ("Merge settings: " + ", ".join(f"`{p}`" for p in parts) + ".") if parts else ""


def _model_link(ref: ModelRef) -> str:
    if ref.local:
        return f"`{ref.display_name}` (local)"
    return f"[{ref.repo}](https://huggingface.co/{ref.repo})"


def _revision(ref: ModelRef, by_repo: Mapping[str, ParentInfo]) -> str:
    parent = by_repo.get(ref.repo)
    sha = parent.revision if parent else ref.revision
    if not sha:
        return "-"
    if ref.local:
        return f"`{sha[:10]}`"
    return f"[`{sha[:10]}`](https://huggingface.co/{ref.repo}/tree/{sha})"


def _params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_value(v)}" for k, v in params.items()) or "-"


def _value(value: Any) -> str:
    """A parameter setting in one cell: scalars, gradients [a, b, c], filters 'q_proj: 0.5; else 0'."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if all(not isinstance(v, dict) for v in value):
            return "[" + ", ".join(_value(v) for v in value) + "]"
        return "; ".join(f"{c['filter']}: {_value(c['value'])}" if c.get("filter") else f"else {_value(c['value'])}"
                         for c in value)
    return str(value)


def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _gguf_table(files: Iterable[GGUFFileInfo], repo: str | None) -> list[str]:
    rows = ["| file | type | size | use |", "|---|---|---|---|"]
    for f in files:
        link = f"[{f.filename}](https://huggingface.co/{repo}/blob/main/{f.filename})" if repo else f"`{f.filename}`"
        rows.append(f"| {link} | {f.quant_type} | {_size(f.size_bytes)} | {GGUF_USES.get(f.quant_type, '-')} |")
    return rows


def _usage(output_name: str, gguf_files: Sequence[GGUFFileInfo], gguf_repo: str | None) -> list[str]:
    lines = ["With transformers:", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "", f'model_id = "{output_name}"', "tokenizer = AutoTokenizer.from_pretrained(model_id)",
             'model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto", device_map="auto")',
             'inputs = tokenizer("The capital of France is", return_tensors="pt").to(model.device)',
             "output = model.generate(**inputs, max_new_tokens=32)",
             "print(tokenizer.decode(output[0], skip_special_tokens=True))", "```", ""]
    if gguf_files:
        lines += _gguf_usage(gguf_files, gguf_repo)
    return lines


def _gguf_usage(files: Sequence[GGUFFileInfo], repo: str | None) -> list[str]:
    pick = next((f for f in files if f.quant_type == "Q4_K_M"), files[0])
    if repo:
        cli = f'llama-cli -hf {repo}:{pick.quant_type} -p "The capital of France is" -n 32'
        load = [f'llm = Llama.from_pretrained(repo_id="{repo}", filename="{pick.filename}")']
    else:
        cli = f'llama-cli -m {pick.filename} -p "The capital of France is" -n 32'
        load = [f'llm = Llama(model_path="{pick.filename}")']
    return (["With llama.cpp:", "", "```bash", cli, "```", "", "With llama-cpp-python:", "", "```python",
             "from llama_cpp import Llama", ""] + load +
            ['print(llm("The capital of France is", max_tokens=32)["choices"][0]["text"])', "```", ""])

