"""Sharing recipes: links that open the app with a recipe, and pull requests to the community recipes dataset.

A link carries either a published model (`?from=org/model`, the app loads its recipe as a remix) or an
unpublished recipe itself (`?recipe=...`: the YAML, deflate-compressed and base64url-encoded), within
MAX_URL characters so it survives browsers, chat apps and proxies. "Publish recipe" proposes the YAML
to a dataset repo on the Hub (RECIPES_DATASET, default DEFAULT_RECIPES_DATASET) as a pull request made
with `create_commit(create_pr=True)`: anyone signed in may propose; the dataset's maintainers merge.
Each recipe is one file `recipes/<slug>-<hash>.yml` whose first comment lines give its title and
description, so the file stays a valid mergekit recipe and merged pull requests never conflict.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import zlib
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlencode

from ..errors import HubError, RecipeError
from ..recipe import parse_model_ref, parse_recipe

DEFAULT_RECIPES_DATASET = "llm-merger/community-recipes"
RECIPES_DATASET_ENV = "MERGER_RECIPES_DATASET"
RECIPES_FOLDER = "recipes"
MAX_URL = 2000  # characters; links longer than this break in some browsers, chat apps and proxies
MAX_RECIPE_BYTES = 64 * 1024  # a decoded link never expands beyond this (no zip bombs)
MAX_TITLE = 80
MAX_DESCRIPTION = 1000
_SLUG = re.compile(r"[^a-z0-9]+")


def recipes_dataset(environ: Mapping[str, str] | None = None) -> str:
    """The community recipes dataset in effect: MERGER_RECIPES_DATASET, else the default."""
    env = os.environ if environ is None else environ
    return (env.get(RECIPES_DATASET_ENV) or DEFAULT_RECIPES_DATASET).strip()


# ---------------------------------------------------------------- links

def base_url(headers: Mapping[str, str], environ: Mapping[str, str] | None = None) -> str:
    """The app's public address: https://<SPACE_HOST> on a Space, else the Host the browser used."""
    env = os.environ if environ is None else environ
    if env.get("SPACE_HOST"):
        return f"https://{env['SPACE_HOST']}"
    host = headers.get("x-forwarded-host") or headers.get("host") or "127.0.0.1:7860"
    scheme = headers.get("x-forwarded-proto") or "http"
    return f"{scheme}://{host}"


def model_link(base_url: str, repo: str) -> str:
    """A link that opens the app with a published model's recipe (as a remix)."""
    ref = parse_model_ref(repo.strip(), "the model to share", allow_local=False)
    return f"{base_url.rstrip('/')}/?{urlencode({'from': str(ref)}, safe='/@')}"


def recipe_link(base_url: str, text: str) -> str:
    """A link that carries the recipe itself; a RecipeError when it would exceed MAX_URL."""
    if not (text or "").strip():
        raise RecipeError("the editor is empty; write or load a recipe before sharing it")
    packed = base64.urlsafe_b64encode(zlib.compress(text.encode("utf-8"), 9)).decode("ascii").rstrip("=")
    link = f"{base_url.rstrip('/')}/?recipe={packed}"
    if len(link) > MAX_URL:
        raise RecipeError(f"this recipe is too long for a link ({len(link)} characters, the limit is {MAX_URL}); "
                          "publish it (Publish recipe, or merge and publish the model) and share that instead")
    return link


@dataclass(frozen=True)
class SharedLink:
    """What a link asked for: a Hub model to remix, or a recipe text."""

    model: str | None = None
    recipe: str | None = None


def parse_link(params: Mapping[str, str]) -> SharedLink | None:
    """The recipe a page's query parameters ask for; None without one; a RecipeError for a broken link."""
    if params.get("recipe"):
        return SharedLink(recipe=decode_recipe(params["recipe"]))
    if params.get("from"):
        ref = parse_model_ref(params["from"].strip(), "the link's 'from' model", allow_local=False)
        return SharedLink(model=str(ref))
    return None


def decode_recipe(packed: str) -> str:
    """The recipe text of a `?recipe=` value (at most MAX_RECIPE_BYTES once expanded)."""
    broken = "this link's recipe is damaged (cut off or edited?); ask for the link again"
    try:
        data = base64.urlsafe_b64decode(packed.strip() + "=" * (-len(packed.strip()) % 4))
        inflater = zlib.decompressobj()
        raw = inflater.decompress(data, MAX_RECIPE_BYTES)
        if inflater.unconsumed_tail:
            raise RecipeError(f"this link's recipe expands beyond {MAX_RECIPE_BYTES // 1024} KiB; it is refused")
        if not inflater.eof:
            raise RecipeError(broken)
        return raw.decode("utf-8")
    except (binascii.Error, zlib.error, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, RecipeError):
            raise
        raise RecipeError(broken) from None


# ---------------------------------------------------------------- publishing to the recipes dataset

@dataclass(frozen=True)
class PublishedRecipe:
    path: str  # the file in the dataset
    pr_url: str
    dataset: str


def recipe_file(text: str, title: str, description: str) -> tuple[str, str]:
    """(path in the dataset, file content): the recipe under a title/description comment header."""
    title = " ".join((title or "").split())
    description = " ".join((description or "").split())
    if not title:
        raise RecipeError("give the recipe a short title before publishing it")
    if len(title) > MAX_TITLE:
        raise RecipeError(f"the title has {len(title)} characters; keep it under {MAX_TITLE}")
    if len(description) > MAX_DESCRIPTION:
        raise RecipeError(f"the description has {len(description)} characters; keep it under {MAX_DESCRIPTION}")
    parse_recipe(text, allow_local=False)  # only runnable, Hub-only recipes are proposed
    body = text if text.endswith("\n") else text + "\n"
    slug = _SLUG.sub("-", title.lower()).strip("-")[:60] or "recipe"
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()[:8]
    header = f"# title: {title}\n" + (f"# description: {description}\n" if description else "")
    return f"{RECIPES_FOLDER}/{slug}-{digest}.yml", header + body


def read_header(content: str) -> tuple[str | None, str | None]:
    """(title, description) from a recipe file's leading comment lines."""
    title = description = None
    for line in content.splitlines():
        if not line.startswith("#"):
            break
        key, _, value = line[1:].strip().partition(":")
        if key.strip() == "title":
            title = value.strip() or None
        elif key.strip() == "description":
            description = value.strip() or None
    return title, description


def publish_recipe(text: str, title: str, description: str, *, token: str | None,
                   dataset: str | None = None) -> PublishedRecipe:
    """Open a pull request adding the recipe to the community dataset; returns its file and PR link."""
    from huggingface_hub import CommitOperationAdd

    from ..hub import _api, _call, validate_repo_id

    dataset = (dataset or recipes_dataset()).strip()
    validate_repo_id(dataset)
    if not token:
        raise HubError("publishing a recipe opens a pull request with your account; sign in first"
                       " (locally: set HF_TOKEN before starting the app)")
    path, content = recipe_file(text, title, description)
    api = _api(token)
    info = _call(lambda: api.create_commit(
        dataset, [CommitOperationAdd(path_in_repo=path, path_or_fileobj=content.encode("utf-8"))],
        commit_message=f"Add recipe: {' '.join(title.split())}",
        commit_description=(" ".join(description.split()) + "\n\n" if description.strip() else "")
        + "Proposed from the merge app's Publish recipe button.", repo_type="dataset", create_pr=True),
        repo_id=dataset, token=token, verb="open a pull request on")
    if not info.pr_url:
        raise HubError(f"the Hub accepted the commit to {dataset} but returned no pull request; check the dataset")
    return PublishedRecipe(path, str(info.pr_url), dataset)
