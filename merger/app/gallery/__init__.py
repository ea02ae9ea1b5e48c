"""The recipe gallery shipped with the app, and recipes read from merged models on the Hub.

The gallery is data (index.yml + one YAML recipe per entry) kept inside the package, so the Space
needs nothing outside the repository. A merged model on the Hub usually carries its recipe either as
`mergekit_config.yml` or as a ```yaml block in its README; both are read with huggingface_hub.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import yaml

from ...errors import HubError, RecipeError
from ...card import MOE_RECIPE_FILE
from ...moe.config import is_moe_config
from ...recipe import parse_model_ref

GALLERY_DIR = Path(__file__).resolve().parent
RECIPE_FILE = "mergekit_config.yml"
_YAML_FENCE = re.compile(r"^```ya?ml[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class GalleryEntry:
    """One example recipe: its file name (the key), a short title and when to use it."""

    key: str
    title: str
    when: str
    text: str
    layers: int | None = None  # the layer count of the models its layer ranges were written for


@lru_cache(maxsize=1)
def load_gallery() -> tuple[GalleryEntry, ...]:
    """Every gallery entry in display order (read once; the files ship with the package)."""
    index = yaml.safe_load((GALLERY_DIR / "index.yml").read_text(encoding="utf-8"))
    return tuple(GalleryEntry(item["file"], item["title"], item["when"],
                              (GALLERY_DIR / item["file"]).read_text(encoding="utf-8"), item.get("layers"))
                 for item in index)


def gallery_entry(key: str) -> GalleryEntry:
    """The entry with this file name; a RecipeError lists the valid ones."""
    for entry in load_gallery():
        if entry.key == key:
            return entry
    from .community import community_entry

    shared = community_entry(key)
    if shared is not None:
        return shared
    raise RecipeError(f"there is no gallery recipe '{key}'; choose one of "
                      + ", ".join(e.key for e in load_gallery()))


_LAYER_RANGE = re.compile(r"^(\s*(?:-\s+)?model\s*:\s*[\"']?)([^\s\"'#]+)([\"']?\s*\n\s*layer_range\s*:\s*)"
                          r"\[\s*(\d+)\s*,\s*(\d+)\s*\]", re.MULTILINE)


def fit_layer_ranges(text: str, written_for: int, layer_count: Callable[[str], int]) -> str:
    """A recipe's `layer_range`s scaled from models of `written_for` layers to each named model's own layer
    count (a 32-layer frankenmerge example put on 4-layer models keeps its shape and stays valid)."""
    def scale(m: re.Match) -> str:
        n = layer_count(m.group(2))
        start = min(n - 1, round(int(m.group(4)) * n / written_for))
        end = max(start + 1, min(n, round(int(m.group(5)) * n / written_for)))
        return f"{m.group(1)}{m.group(2)}{m.group(3)}[{start}, {end}]"

    return _LAYER_RANGE.sub(scale, text)


def recipe_in_readme(readme: str) -> str | None:
    """The first ```yaml block of a model card that looks like a merge recipe (has merge_method)."""
    for block in _YAML_FENCE.findall(readme):
        try:
            data = yaml.safe_load(block)
        except yaml.YAMLError:
            continue
        if isinstance(data, dict) and ("merge_method" in data or is_moe_config(data)):
            return block
    return None


def recipe_from_hub(repo: str, *, token: str | None = None) -> str:
    """The recipe a merged Hub model was made from: its mergekit_config.yml (mergekit_moe_config.yml for a
    mergekit-moe MoE), else the README's YAML block."""
    from ...hub import read_text, resolve

    ref = parse_model_ref(repo, "the model to read a recipe from", allow_local=False)
    model = resolve(ref, token=token)
    for name in (RECIPE_FILE, MOE_RECIPE_FILE, "README.md"):
        if name in model.files:
            text = read_text(model, name, token=token)
            found = text if name != "README.md" else recipe_in_readme(text)
            if found:
                return found
    raise HubError(f"{ref} has neither {RECIPE_FILE} nor a YAML recipe block in its README; "
                   "it may not be a merge, or its recipe is not published")
