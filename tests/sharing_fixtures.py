"""Hub repos for the community-sharing tests: model cards with lineage metadata, fake safetensors sizes.

A listed model needs no weights: the Hub's size filter reads safetensors headers, so a header that
declares N parameters (and no tensor bytes) is enough to place a model in a size range.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Sequence

import yaml

from tests.hubserver import HubServer


def header_only_safetensors(parameters: int) -> bytes:
    """A safetensors header declaring `parameters` bf16 values in one tensor (no data follows)."""
    header = json.dumps({"w": {"dtype": "BF16", "shape": [parameters], "data_offsets": [0, 2 * parameters]}}).encode()
    return struct.pack("<Q", len(header)) + header


def model_card(*, bases: Sequence[str] = (), relation: str | None = None, tags: Sequence[str] = (),
               license: str | None = "apache-2.0", body: str = "") -> str:
    data: dict[str, Any] = {}
    if license:
        data["license"] = license
    if bases:
        data["base_model"] = list(bases) if len(bases) > 1 else bases[0]
    if relation:
        data["base_model_relation"] = relation
    if tags:
        data["tags"] = list(tags)
    return f"---\n{yaml.safe_dump(data, sort_keys=False)}---\n\n# model\n\n{body}"


def publish_model(hub: HubServer, repo: str, *, bases: Sequence[str] = (), relation: str | None = None,
                  tags: Sequence[str] = (), license: str | None = "apache-2.0", model_type: str = "llama",
                  parameters: int = 1_000_000, recipe: str | None = None, readme: str | None = None,
                  private: bool = False, likes: int = 0, downloads: int = 0) -> str:
    """A model repo with a card, config.json and a header-only safetensors file; returns its commit sha."""
    if repo not in hub.repos:
        hub.create_repo(repo, private=private)
    files = {"README.md": (readme or model_card(bases=bases, relation=relation, tags=tags, license=license)).encode(),
             "config.json": json.dumps({"model_type": model_type}).encode(),
             "model.safetensors": header_only_safetensors(parameters)}
    if recipe is not None:
        files["mergekit_config.yml"] = recipe.encode()
    sha = hub.commit_files(repo, files)
    hub.set_popularity(repo, likes=likes, downloads=downloads)
    return sha


def recipe_of(method: str, models: Sequence[str], base: str | None = None) -> str:
    lines = ["models:"] + [f"  - model: {m}\n    parameters: {{weight: 0.5}}" for m in models]
    lines.append(f"merge_method: {method}")
    if base:
        lines.append(f"base_model: {base}")
    return "\n".join(lines) + "\ndtype: float16\n"
