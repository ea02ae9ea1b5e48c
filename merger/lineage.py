"""A merged model's family tree, read from Hub card metadata: parents of parents, with how each was made.

Hub convention only: a model card's `base_model` (one id or a list) names its parents and
`base_model_relation` says how it was derived (`merge`, `finetune`, `adapter`, `quantized`; the Hub
infers `merge` for several parents and `finetune` for one). For a merge, the edge carries the merge
method: a method name among the card's tags (this tool's cards tag it), else the `merge_method` of the
repo's `mergekit_config.yml` at the same commit. Pinned parent revisions come from this tool's card
(its parents table links `/<repo>/tree/<sha>`) or from `@sha` pins in the recipe.

Reading is best effort: a parent that cannot be read (private, deleted, network) stays in the tree,
marked unavailable with the reason, so a lineage never fails a merge or a page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import yaml

from .errors import MergerError
from .methods import METHODS

RECIPE_FILE = "mergekit_config.yml"
MAX_DEPTH = 4
MAX_NODES = 30
_SHA_LINK = re.compile(r"/(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)/tree/(?P<sha>[0-9a-f]{40})\b")
_PIN = re.compile(r"^(?P<repo>[^@\s]+/[^@\s]+)@(?P<sha>[0-9a-f]{40})$")


@dataclass(frozen=True)
class Edge:
    """`parent` went into `child`; `label` is the merge method or the relation (finetune, quantized, ...)."""

    parent: str
    child: str
    label: str


@dataclass(frozen=True)
class Node:
    repo: str
    depth: int  # 0 = a root of the tree (the model asked about), 1 = its parents, ...
    license: str | None = None
    unavailable: str | None = None  # why the card could not be read


@dataclass
class Lineage:
    roots: list[str]
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    truncated: bool = False  # stopped at MAX_DEPTH / MAX_NODES

    def parents(self, repo: str) -> list[Edge]:
        return [e for e in self.edges if e.child == repo]


@dataclass(frozen=True)
class CardFacts:
    """What one model card says about the model's origin."""

    parents: tuple[str, ...]
    relation: str | None
    method: str | None
    license: str | None
    revisions: dict[str, str]  # parent repo -> the commit that was merged, when the card records it


def card_facts(repo: str, *, token: str | None = None, revision: str | None = None) -> CardFacts:
    """The parents, relation, method, licence and pinned parent revisions of one Hub model."""
    from .hub import _api, _call

    api = _api(token)
    info = _call(lambda: api.model_info(repo, revision=revision), repo_id=repo, token=token, revision=revision)
    card = info.card_data
    bases = card.get("base_model") if card else None
    parents = tuple([bases] if isinstance(bases, str) else [b for b in bases or () if isinstance(b, str)])
    relation = (card.get("base_model_relation") if card else None) or (
        "merge" if len(parents) > 1 else "finetune" if parents else None)
    license_ = card.get("license") if card else None
    method = next((t for t in info.tags or () if t in METHODS), None)
    revisions: dict[str, str] = {}
    files = {s.rfilename for s in info.siblings or ()}
    recipe = _read(repo, RECIPE_FILE, str(info.sha), files, token)
    if recipe:
        method = method or _recipe_method(recipe)
        revisions.update(pins_in_recipe(recipe))
    readme = _read(repo, "README.md", str(info.sha), files, token) if parents else None
    if readme:
        revisions.update({r: s for r, s in revisions_in_card(readme).items() if r in parents})
    return CardFacts(parents, relation, method, license_ if isinstance(license_, str) else None, revisions)


def family_tree(repos: Sequence[str], *, token: str | None = None, max_depth: int = MAX_DEPTH,
                max_nodes: int = MAX_NODES) -> Lineage:
    """The ancestors of `repos` (breadth first), each edge labelled with the method or relation."""
    tree = Lineage(roots=list(dict.fromkeys(repos)))
    frontier = [(r, 0) for r in tree.roots]
    while frontier:
        repo, depth = frontier.pop(0)
        if repo in tree.nodes:
            continue
        if len(tree.nodes) >= max_nodes:
            tree.truncated = True
            break
        try:
            facts = card_facts(repo, token=token)
        except MergerError as e:
            tree.nodes[repo] = Node(repo, depth, unavailable=str(e))
            continue
        tree.nodes[repo] = Node(repo, depth, facts.license)
        if not facts.parents:
            continue
        if depth + 1 > max_depth:
            tree.truncated = True
            continue
        label = (facts.method or "merge") if facts.relation == "merge" else (facts.relation or "finetune")
        for parent in facts.parents:
            tree.edges.append(Edge(parent, repo, label))
            frontier.append((parent, depth + 1))
    for edge in tree.edges:  # parents beyond the limits are still named
        tree.nodes.setdefault(edge.parent, Node(edge.parent, tree.nodes[edge.child].depth + 1,
                                                unavailable="not read (tree limit)"))
    return tree


def merge_lineage(output: str, method: str, parents: Sequence[str], *, token: str | None = None,
                  max_depth: int = MAX_DEPTH - 1) -> Lineage:
    """The tree of a new merge: `output` made from `parents` with `method`, then the parents' own trees."""
    ancestors = family_tree(parents, token=token, max_depth=max_depth) if parents else Lineage([])
    tree = Lineage(roots=[output], truncated=ancestors.truncated)
    tree.nodes[output] = Node(output, 0)
    for node in ancestors.nodes.values():
        tree.nodes[node.repo] = Node(node.repo, node.depth + 1, node.license, node.unavailable)
    tree.edges = [Edge(p, output, method) for p in dict.fromkeys(parents)] + ancestors.edges
    return tree


def revisions_in_card(readme: str) -> dict[str, str]:
    """Parent repo -> commit sha from links to `/<repo>/tree/<sha>` (this tool's parents table)."""
    out: dict[str, str] = {}
    for m in _SHA_LINK.finditer(readme):
        out.setdefault(m.group("repo"), m.group("sha"))
    return out


def pins_in_recipe(recipe: str) -> dict[str, str]:
    """Repo -> sha for models a recipe pins as `org/name@<40-hex sha>`."""
    out: dict[str, str] = {}
    for value in _model_values(_safe_yaml(recipe)):
        m = _PIN.match(value)
        if m:
            out.setdefault(m.group("repo"), m.group("sha"))
    return out


def _model_values(data: Any) -> list[str]:
    found: list[str] = []
    if isinstance(data, dict):
        for k, v in data.items():
            if k in ("model", "base_model") and isinstance(v, str):
                found.append(v)
            else:
                found += _model_values(v)
    elif isinstance(data, list):
        for v in data:
            found += _model_values(v)
    return found


def _safe_yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text) if len(text) <= 256_000 else None
    except yaml.YAMLError:
        return None


def _recipe_method(recipe: str) -> str | None:
    data = _safe_yaml(recipe)
    method = data.get("merge_method") if isinstance(data, dict) else None
    return method if isinstance(method, str) else None


def _read(repo: str, name: str, sha: str, files: set[str], token: str | None) -> str | None:
    """A small text file of the model at `sha`, or None when it is missing or unreadable."""
    from pathlib import Path

    from huggingface_hub import hf_hub_download

    from .hub import hub_endpoint

    if name not in files:
        return None
    try:
        path = hf_hub_download(repo, name, revision=sha, token=token or False, endpoint=hub_endpoint())
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except Exception:  # a card we cannot read only loses its details, never the tree
        return None
