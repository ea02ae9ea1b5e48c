"""The model card of a merge: lineage, method, recipe, licence, GGUF files, usage, how to reproduce it.

Built with huggingface_hub's ModelCard/ModelCardData so the front matter is what the Hub expects
(base_model + base_model_relation: merge, license, tags); it passes the Hub's metadata validation.
The card also carries this tool's tag, which is how a later push recognises a repo it made.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import yaml
from huggingface_hub import ModelCard, ModelCardData

from .errors import RecipeError
from .methods import get_method
from .recipe import InputModel, ModelRef, Recipe

if TYPE_CHECKING:
    from .lineage import Lineage
# The merge methods mergekit 0.1.5 registers: a recipe using one runs under `mergekit-yaml` too.
MERGEKIT_METHODS = frozenset({
    "linear", "slerp", "nuslerp", "multislerp", "karcher", "nearswap", "task_arithmetic", "ties", "dare_ties",
    "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "model_stock",
    "passthrough", "arcee_fusion", "ram", "ramplus_tl"})

RECIPE_FILE = "mergekit_config.yml"
MOE_RECIPE_FILE = "mergekit_moe_config.yml"  # mergekit-moe's name for the config of a MoE
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


# ---------------------------------------------------------------- local parents of a published merge

_COMMIT = re.compile(r"[0-9a-f]{40}")
_CACHE_REPO = re.compile(r"models--([\w.-]+?)(?:--([\w.-]+))?")


def hub_origin(folder: str | Path) -> ModelRef | None:
    """The Hub repo and commit of a Hugging Face cache snapshot (`.../models--org--name/snapshots/<sha>`);
    None for any other folder (a subfolder of a snapshot included: that is not the repo's model)."""
    parts = Path(str(folder).rstrip("/\\")).parts
    if len(parts) < 3 or parts[-2] != "snapshots" or not _COMMIT.fullmatch(parts[-1]):
        return None
    match = _CACHE_REPO.fullmatch(parts[-3])
    if match is None or "--" in (match.group(2) or ""):
        return None
    repo = f"{match.group(1)}/{match.group(2)}" if match.group(2) else match.group(1)
    return ModelRef(repo, parts[-1], False)


def publishable_recipe(recipe: Recipe, *, allow_local_paths: bool = False) -> Recipe:
    """The recipe as it may be published (card, mergekit_config.yml): each local folder that is a Hub-cache
    snapshot becomes `org/name@sha` in the text and the models; a folder with no Hub origin is refused
    (one line) unless `allow_local_paths`, in which case its path is published as written."""
    origins = {ref: hub_origin(ref.repo) for ref in recipe.referenced_models() if ref.local}
    if not origins:
        return recipe
    text, rewritten = _rewrite_snapshot_paths(recipe.text)
    for ref, origin in origins.items():
        if origin is None and not allow_local_paths:
            raise RecipeError(f"publishing would write the local folder {ref.repo} into the public card and "
                              f"{RECIPE_FILE}, and it has no Hub origin; name the model by its Hub repo ID "
                              "(org/name), or pass --allow-local-paths to publish the path as written")
        if origin is not None and origin not in rewritten and not allow_local_paths:
            raise RecipeError(f"{ref.repo} is the Hub model {origin} but the recipe names it by another path; "
                              f"write '{origin}' in the recipe instead, so the published recipe names it")
    published = recipe.with_models({ref: origin for ref, origin in origins.items() if origin in rewritten})
    return dataclasses.replace(published, text=text)


def _rewrite_snapshot_paths(text: str) -> tuple[str, set[ModelRef]]:
    """Replace every YAML scalar that is a Hub-cache snapshot path by `org/name@sha`, keeping the rest of
    the text (comments, order, spacing) as the user wrote it."""
    spans: list[tuple[int, int, ModelRef]] = []

    def walk(node: yaml.Node, key: str | None) -> None:
        if isinstance(node, yaml.ScalarNode):
            origin = hub_origin(node.value) if key != "chat_template" and node.style not in ("|", ">") else None
            if origin is not None:
                spans.append((node.start_mark.index, node.end_mark.index, origin))
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item, key)
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                walk(v, k.value if isinstance(k, yaml.ScalarNode) else None)

    root = yaml.compose(text, Loader=yaml.SafeLoader)  # already parsed once with the recipe's limits
    if root is not None:
        walk(root, None)
    for start, end, origin in sorted(spans, key=lambda s: s[0], reverse=True):
        text = text[:start] + str(origin) + text[end:]
    return text, {origin for _, _, origin in spans}


# ---------------------------------------------------------------- the card

def build_card(recipe: Recipe, *, parents: Sequence[ParentInfo], output_name: str,
               gguf_files: Sequence[GGUFFileInfo] = (), gguf_repo: str | None = None,
               sanity: Mapping[str, Any] | None = None, seed: int | None = None,
               evaluation: Sequence[str] | None = None, lineage: "Lineage | None" = None,
               remixed_from: str | None = None) -> ModelCard:
    """The README.md of a merged model. `output_name` is its repo id (`user/name`) or a local name.

    `lineage` (merger.lineage.merge_lineage) adds the family tree; `remixed_from` links the model whose
    recipe this merge was remixed from.
    """
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
    if remixed_from:
        body += [f"Remixed from {_hub_link(remixed_from)}: its recipe, edited and merged again.", ""]
    if conflict:
        body += [f"> **Licence warning:** {conflict}.", ""]
    body += ["## Merged models", ""] + _parents_table(recipe, by_repo) + [""]
    settings = _settings_line(recipe)
    if settings:
        body += [settings, ""]
    if lineage is not None and lineage.edges:
        body += lineage_section(lineage) + [""]
    body += ["## Recipe", "", f"The recipe, also in [`{RECIPE_FILE}`]({RECIPE_FILE}):", "", "```yaml",
             recipe.text.rstrip("\n"), "```", ""]
    if gguf_files:
        body += ["## GGUF files", ""] + _gguf_table(gguf_files, gguf_repo) + [""]
    body += ["## Usage", ""] + _usage(output_name, gguf_files, gguf_repo)
    if sanity:
        body += ["## Sanity checks", "", "| check | result |", "|---|---|"]
        body += [f"| {k} | {_cell(v)} |" for k, v in sanity.items()] + [""]
    body += ["## Evaluation", ""] + ([*evaluation, ""] if evaluation else [])
    body += ["Evaluate the merge further with "
             "[lm-evaluation-harness](https://github.com/EleutherAI/lm-evaluation-harness):", "", "```bash",
             f"lm_eval --model hf --model_args pretrained={output_name},dtype=auto "
             f"--tasks {','.join(EVAL_TASKS)} --batch_size auto", "```", ""]
    seed_arg = f" --seed {seed}" if seed is not None and method.randomized else ""
    body += ["## Reproduce this merge", "", f"Download [`{RECIPE_FILE}`]({RECIPE_FILE}) and run:", "", "```bash",
             install_command(), f"python -m merger run {RECIPE_FILE} OUT{seed_arg}", "```", ""]
    if recipe.method in MERGEKIT_METHODS:
        body += ["The recipe is mergekit-compatible; with [mergekit](https://github.com/arcee-ai/mergekit) 0.1.5:", "",
                 "```bash", "pip install mergekit==0.1.5", f"mergekit-yaml {RECIPE_FILE} OUT", "```", ""]
        if method.randomized:
            body += ["mergekit draws the random masks of this method differently, so its result is equally valid "
                     "but not identical.", ""]
    if any(p.revision for p in parents if not p.local):
        body += ["The parent revisions listed above are the exact commits that were merged; pin them as "
                 "`org/name@sha` in the recipe to get the same result after the parents change.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def install_command(environ: Mapping[str, str] | None = None) -> str:
    """How to install this tool: from the Space that made the merge when known, else from a checkout."""
    env = os.environ if environ is None else environ
    source = env.get("MERGER_INSTALL_SOURCE") or (
        f"git+https://huggingface.co/spaces/{env['SPACE_ID']}" if env.get("SPACE_ID") else "")
    return f'pip install "llm-merger @ {source}"' if source else "pip install .  # in a checkout of llm-merger"


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
    if repo:  # gguf-my-repo's lines: llama.cpp downloads the named file from the repo itself
        cli = "\n".join([f'llama-cli -hf {repo}:{pick.quant_type} -p "The capital of France is" -n 32',
                         f'llama-cli --hf-repo {repo} --hf-file {pick.filename} -p "The capital of France is"',
                         f"llama-server --hf-repo {repo} --hf-file {pick.filename} -c 2048"])
        load = [f'llm = Llama.from_pretrained(repo_id="{repo}", filename="{pick.filename}")']
    else:
        cli = f'llama-cli -m {pick.filename} -p "The capital of France is" -n 32'
        load = [f'llm = Llama(model_path="{pick.filename}")']
    return (["With llama.cpp:", "", "```bash", cli, "```", "", "With llama-cpp-python:", "", "```python",
             "from llama_cpp import Llama", ""] + load +
            ['print(llm("The capital of France is", max_tokens=32)["choices"][0]["text"])', "```", ""])


# ---------------------------------------------------------------- lineage (family tree)

def lineage_section(tree: "Lineage") -> list[str]:
    """The family tree as a nested list: each parent with how it went into its child, grandparents below."""
    lines = ["## Lineage", "", "How this model came to be, read from its parents' model cards (each entry: the "
             "model, and the method or relation by which it went into the entry above it):", ""]
    shown: set[str] = set()

    def walk(child: str, indent: int) -> None:
        for edge in tree.parents(child):
            node = tree.nodes.get(edge.parent)
            note = f" — {node.unavailable}" if node is not None and node.unavailable else ""
            again = edge.parent in shown
            lines.append(f"{'  ' * indent}- {_hub_link(edge.parent)} ({edge.label}){' (see above)' if again else note}")
            if not again:
                shown.add(edge.parent)
                walk(edge.parent, indent + 1)

    for root in tree.roots:
        walk(root, 0)
    if tree.truncated:
        lines += ["", "The tree stops at its size limit; older ancestors are on the listed models' pages."]
    return lines


def _hub_link(repo: str) -> str:
    return f"[{repo}](https://huggingface.co/{repo})"

