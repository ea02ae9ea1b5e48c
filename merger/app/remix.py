"""Remix: a published merge's recipe, loaded with every parent pinned to the commit that was merged.

The commits come from the model's card (this tool's parents table links each parent's `tree/<sha>`) or
from `@sha` pins already in its recipe. A parent whose commit is not recorded stays unpinned and is
named in the status line, so the user knows the remix may differ from the original. The proposed repo
name is `<you>/<name>-remix`; a merge made while the recipe still uses the source's models records the
source, and its card links to it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..errors import HubError
from ..recipe import parse_model_ref
from .demo import JobRequest, recipe_models, substitute_models

_SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Remix:
    source: str  # the Hub model remixed
    text: str  # its recipe, parents pinned where known
    repo_name: str  # the proposed output repo
    pinned: dict[str, str]  # parent -> sha written into the recipe
    unpinned: tuple[str, ...]  # parents whose merged commit is not recorded

    def state(self) -> dict[str, Any]:
        """What the page keeps to recognise the remix later (source, its models, the loaded text)."""
        return {"source": self.source, "models": recipe_models(self.text), "text": self.text}

    def status(self) -> str:
        """One Markdown line for the page."""
        parts = [f"Remixing [{self.source}](https://huggingface.co/{self.source})."]
        if self.pinned:
            parts.append(f"{len(self.pinned)} parent(s) pinned to the commit that was merged: "
                         + ", ".join(f"`{r}@{s[:10]}`" for r, s in self.pinned.items()) + ".")
        if self.unpinned:
            parts.append("Not pinned (the merged commit is not recorded in its card): "
                         + ", ".join(f"`{r}`" for r in self.unpinned) + "; they follow their latest version.")
        return " ".join(parts)


def remix(repo: str, *, token: str | None = None, username: str | None = None) -> Remix:
    """Load `repo`'s recipe as a remix; a HubError when it has no published recipe."""
    from ..lineage import card_facts
    from .gallery import recipe_from_hub

    ref = parse_model_ref(repo.strip(), "the model to remix", allow_local=False)
    text = recipe_from_hub(str(ref), token=token)
    facts = card_facts(ref.repo, token=token, revision=ref.revision)
    pinned: dict[str, str] = {}
    unpinned: list[str] = []
    replaced: list[str] = []
    for model in recipe_models(text):
        name, _, revision = model.partition("@")
        if _SHA.match(revision):
            pinned[name] = revision
            replaced.append(model)
        elif name in facts.revisions:
            pinned[name] = facts.revisions[name]
            replaced.append(f"{name}@{facts.revisions[name]}")
        else:
            if "/" not in name or name.startswith((".", "/", "~")):
                raise HubError(f"{ref}'s recipe names a local folder ({name}); it cannot be remixed from the Hub")
            unpinned.append(model)
            replaced.append(model)
    return Remix(str(ref), substitute_models(text, replaced), remix_name(ref.repo, username), pinned,
                 tuple(unpinned))


def remix_name(repo: str, username: str | None) -> str:
    """`<you>/<name>-remix` within the Hub's 96-character name limit."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", repo.split("/")[-1]).strip("-.") or "model"
    name = re.sub(r"-{2,}", "-", name[:96 - len("-remix")].rstrip("-.") + "-remix")
    return f"{username}/{name}" if username else name


def still_remix(source_models: Sequence[str], text: str) -> bool:
    """Whether a recipe still uses at least one of the remixed recipe's models (then it is a remix)."""
    current = {m.partition("@")[0] for m in recipe_models(text)}
    return any(m.partition("@")[0] in current for m in source_models)


def unchanged(remix_of: Mapping[str, Any] | None, text: str) -> bool:
    """Whether the editor still holds the remixed recipe as loaded (editors may trim trailing blank lines)."""
    return bool(remix_of and remix_of.get("source")
                and str(remix_of.get("text", "")).rstrip() == (text or "").rstrip())


def apply_remix(request: JobRequest, remix_of: Mapping[str, Any] | None, text: str) -> JobRequest:
    """The job request with `remixed_from` set when the recipe is still a remix (see Remix.state)."""
    if not remix_of or not remix_of.get("source") or not still_remix(remix_of.get("models") or (), text):
        return request
    return dataclasses.replace(request, options=dataclasses.replace(request.options,
                                                                    remixed_from=str(remix_of["source"])))
