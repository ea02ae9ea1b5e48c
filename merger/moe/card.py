"""The model card of a MoE built from a mergekit-moe config: experts, their prompts, the routers, the config."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from huggingface_hub import ModelCard, ModelCardData

from ..card import (MOE_RECIPE_FILE, TOOL_TAG, GGUFFileInfo, ParentInfo, _cell, _gguf_table, _license_fields,
                    _model_link, _revision, _usage, license_conflict, lineage_section, merged_license)
from .config import Expert, MoERecipe

GATE_SENTENCES = {
    "hidden": "the base model's hidden state at the last token of each expert's prompts, per layer",
    "hidden_last": "the base model's hidden state at the last token of each expert's prompts, per layer",
    "hidden_avg": "the base model's hidden states averaged over each expert's prompts, per layer",
    "cheap_embed": "the averaged token embeddings of each expert's prompts (the same in every layer)",
    "random": "random normal draws (the model needs training before its routing means anything)",
    "uniform_random": "uniform random draws, as torch.nn.Linear initialises (the model needs training first)",
}


def build_moe_card(recipe: MoERecipe, *, parents: Sequence[ParentInfo], output_name: str,
                   gguf_files: Sequence[GGUFFileInfo] = (), gguf_repo: str | None = None,
                   sanity: Mapping[str, Any] | None = None, seed: int | None = None,
                   evaluation: Sequence[str] | None = None, lineage: Any = None,
                   remixed_from: str | None = None) -> ModelCard:
    """README.md of the MoE (merger.card.build_card's signature, so the pipeline calls either)."""
    by_repo = {p.repo: p for p in parents}
    hub_parents = [p.repo for p in parents if not p.local]
    license_, license_name, license_link = _license_fields(merged_license(parents))
    tags = ["merge", "mergekit", TOOL_TAG, "moe", "mergekit-moe"] + (["gguf"] if gguf_files else [])
    data = ModelCardData(base_model=hub_parents or None, library_name="transformers", license=license_,
                         license_name=license_name, license_link=license_link, pipeline_tag="text-generation",
                         tags=tags)
    if hub_parents:
        data.base_model_relation = "merge"
    name = output_name.split("/")[-1]
    body = [f"# {name}", "",
            f"A mixture of experts made from a mergekit-moe config: the attention and embeddings of "
            f"{_model_link(recipe.base_model)}, the MLPs of {len(recipe.experts)} expert models in every layer "
            f"({recipe.experts_per_token} chosen per token)"
            + (", plus one shared expert that sees every token" if recipe.shared_experts else "")
            + f". The routers were initialised from {GATE_SENTENCES[recipe.gate_mode]}.", ""]
    if remixed_from:
        body += [f"Remixed from [{remixed_from}](https://huggingface.co/{remixed_from}): its config, edited and "
                 "built again.", ""]
    conflict = license_conflict(parents)
    if conflict:
        body += [f"> **Licence warning:** {conflict}.", ""]
    body += ["## Experts", "", "| expert | model | revision | positive prompts | negative prompts |", "|---|---|---|---|---|"]
    rows: list[tuple[str, Expert]] = [(str(i), e) for i, e in enumerate(recipe.experts)]
    rows += [("shared", e) for e in recipe.shared_experts]
    for label, e in rows:
        body.append(f"| {label} | {_model_link(e.model)} | {_revision(e.model, by_repo)} | "
                    f"{_cell('; '.join(e.positive_prompts)) or '-'} | {_cell('; '.join(e.negative_prompts)) or '-'} |")
    body += ["", f"Base model (attention, embeddings, norms): {_model_link(recipe.base_model)} "
                 f"({_revision(recipe.base_model, by_repo)}).", ""]
    if lineage is not None and lineage.edges:
        body += lineage_section(lineage) + [""]
    body += ["## Config", "", f"The mergekit-moe config, also in [`{MOE_RECIPE_FILE}`]({MOE_RECIPE_FILE}):", "",
             "```yaml", recipe.text.rstrip("\n"), "```", ""]
    if gguf_files:
        body += ["## GGUF files", ""] + _gguf_table(gguf_files, gguf_repo) + [""]
    body += ["## Usage", ""] + _usage(output_name, gguf_files, gguf_repo)
    if sanity:
        body += ["## Sanity checks", "", "| check | result |", "|---|---|"]
        body += [f"| {k} | {_cell(v)} |" for k, v in sanity.items()] + [""]
    if evaluation:
        body += ["## Evaluation", "", *evaluation, ""]
    random_gates = recipe.gate_mode in ("random", "uniform_random") or any(
        e.noise_scale for e in recipe.experts + recipe.shared_experts)
    seed_arg = f" --seed {seed}" if seed is not None and random_gates else ""
    body += ["## Reproduce", "", f"Download [`{MOE_RECIPE_FILE}`]({MOE_RECIPE_FILE}) and run:", "", "```bash",
             f"python -m merger run {MOE_RECIPE_FILE} OUT{seed_arg}", "```", "",
             f"mergekit-moe builds the same model from it (`mergekit-moe {MOE_RECIPE_FILE} OUT`"
             + (f" `--random-seed {seed}`" if seed_arg and recipe.gate_mode in ("random", "uniform_random") else "")
             + "), with its experts in transformers 5's fused layout.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
