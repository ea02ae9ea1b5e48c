"""The recipe browser: merged models on the Hub that carry a recipe, filtered and sorted by the Hub.

Hub conventions only. A merged model is one tagged `merge` or `mergekit` (mergekit's and this tool's
cards carry both), or one whose card says `base_model_relation: merge` (the Hub tags it
`base_model:merge:<parent>`, which is how the base-model filter finds it). Base model, architecture
(the config's `model_type`, which the Hub adds as a tag), size (`num_parameters`) and sort order are
`list_models` arguments, so the Hub does the filtering. The merge method is read from the card's tags
or, failing that, from the model's `mergekit_config.yml`; a method filter is applied to those rows.

Results are cached per query (and per token, since private models differ) for CACHE_SECONDS.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Sequence

from ..errors import RecipeError
from ..methods import METHODS

CACHE_SECONDS = 300.0
MERGE_TAGS = ("merge", "mergekit")
SORTS = {"likes": "likes", "downloads": "downloads", "recent": "last_modified"}
SIZES = {  # label -> the Hub's num_parameters range
    "any size": None, "under 3B": "max:3B", "3B to 9B": "min:3B,max:9B", "9B to 20B": "min:9B,max:20B",
    "20B to 40B": "min:20B,max:40B", "over 40B": "min:40B",
}
DEFAULT_LIMIT = 30
_EXPAND = ["cardData", "tags", "likes", "downloads", "lastModified", "safetensors", "sha", "siblings"]
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_WORD = re.compile(r"^[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class RecipeQuery:
    """What the browser asks for; every field is optional."""

    search: str = ""
    base_model: str = ""
    architecture: str = ""
    size: str = "any size"
    method: str = ""
    sort: str = "likes"
    limit: int = DEFAULT_LIMIT

    def validated(self) -> "RecipeQuery":
        """The query with whitespace trimmed; a RecipeError names the field that is wrong and how to fix it."""
        q = RecipeQuery(self.search.strip(), self.base_model.strip(), self.architecture.strip().lower(),
                        self.size or "any size", self.method.strip(), self.sort or "likes", int(self.limit))
        if q.base_model and not _REPO.match(q.base_model):
            raise RecipeError(f"base model '{q.base_model}' is not a Hub model id; write it as org/name")
        if q.architecture and not _WORD.match(q.architecture):
            raise RecipeError(f"architecture '{q.architecture}' is not a model type; use e.g. llama, mistral, qwen2")
        if q.size not in SIZES:
            raise RecipeError(f"size '{q.size}' is not offered; choose one of {', '.join(SIZES)}")
        if q.method and q.method not in METHODS:
            raise RecipeError(f"'{q.method}' is not a merge method; choose one of {', '.join(METHODS)}")
        if q.sort not in SORTS:
            raise RecipeError(f"sort '{q.sort}' is not offered; choose one of {', '.join(SORTS)}")
        if not 1 <= q.limit <= 100:
            raise RecipeError("show between 1 and 100 models per search")
        return q


@dataclass(frozen=True)
class RecipeRow:
    """One merged model as the browser lists it."""

    repo: str
    method: str | None
    parents: tuple[str, ...]
    license: str | None
    likes: int
    downloads: int
    last_modified: datetime | None
    parameters: int | None
    sha: str | None

    def cells(self) -> list[Any]:
        """The row of the browser's table."""
        return [self.repo, self.method or "?", ", ".join(self.parents) or "-", self.license or "?",
                self.likes, self.downloads, human_parameters(self.parameters),
                self.last_modified.strftime("%Y-%m-%d") if self.last_modified else "-"]


COLUMNS = ["model", "method", "parents", "licence", "likes", "downloads", "size", "updated"]


def human_parameters(n: int | None) -> str:
    if not n:
        return "?"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


class RecipeBrowser:
    """Searches with a per-query cache; one instance serves the whole app (thread-safe)."""

    def __init__(self, *, ttl: float = CACHE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self.clock = ttl, clock
        self._lock = threading.Lock()
        self._cache: dict[tuple[RecipeQuery, str], tuple[float, list[RecipeRow]]] = {}
        self._methods: dict[tuple[str, str], str | None] = {}  # (repo, sha) -> method; a commit never changes

    def search(self, query: RecipeQuery, *, token: str | None = None) -> list[RecipeRow]:
        query = query.validated()
        key = (query, hashlib.sha256((token or "").encode()).hexdigest()[:16])
        now = self.clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit and now - hit[0] < self.ttl:
                return hit[1]
        rows = self._search(query, token)
        with self._lock:
            self._cache = {k: v for k, v in self._cache.items() if now - v[0] < self.ttl}
            self._cache[key] = (now, rows)
        return rows

    def _search(self, q: RecipeQuery, token: str | None) -> list[RecipeRow]:
        from ..hub import _api, _call

        api = _api(token)
        extra = [q.architecture] if q.architecture else []
        tag_sets = [[tag] for tag in MERGE_TAGS]
        if q.base_model:
            tag_sets = [[tag, f"base_model:{q.base_model}"] for tag in MERGE_TAGS]
            tag_sets.append([f"base_model:merge:{q.base_model}"])
        fetch = q.limit * 3 if q.method else q.limit  # a method filter drops rows after the listing
        found: dict[str, Any] = {}
        for tags in tag_sets:
            listing = _call(lambda tags=tags: list(api.list_models(
                filter=tags + extra, search=q.search or None, num_parameters=SIZES[q.size], sort=SORTS[q.sort],
                limit=fetch, expand=_EXPAND)), repo_id=None, token=token)
            for info in listing:
                found.setdefault(info.id, info)
        rows = [self._row(info) for info in found.values()]
        self._fill_methods(rows, token)
        rows = [r for r in self._resolved(rows) if not q.method or r.method == q.method]
        rows.sort(key=_sort_key(q.sort), reverse=True)
        return rows[:q.limit]

    def _row(self, info: Any) -> RecipeRow:
        card = info.card_data
        bases = card.get("base_model") if card else None
        parents = tuple([bases] if isinstance(bases, str) else [b for b in bases or () if isinstance(b, str)])
        license_ = card.get("license") if card else None
        if not isinstance(license_, str):
            license_ = next((t.split(":", 1)[1] for t in info.tags or () if t.startswith("license:")), None)
        method = next((t for t in info.tags or () if t in METHODS), None)
        if method:
            with self._lock:
                self._methods[(info.id, str(info.sha))] = method
        params = info.safetensors.total if info.safetensors else None
        return RecipeRow(info.id, method, parents, license_, int(info.likes or 0), int(info.downloads or 0),
                         info.last_modified, params, str(info.sha) if info.sha else None)

    def _fill_methods(self, rows: Sequence[RecipeRow], token: str | None) -> None:
        """Read mergekit_config.yml of rows whose tags do not name the method (at most 8 at a time)."""
        todo = [r for r in rows if r.sha and (r.repo, r.sha) not in self._methods]
        if not todo:
            return
        with ThreadPoolExecutor(max_workers=min(8, len(todo))) as pool:
            methods = list(pool.map(lambda r: _recipe_method(r.repo, r.sha, token), todo))
        with self._lock:
            for row, method in zip(todo, methods):
                self._methods[(row.repo, row.sha)] = method

    def _resolved(self, rows: Sequence[RecipeRow]) -> list[RecipeRow]:
        with self._lock:
            return [RecipeRow(r.repo, self._methods.get((r.repo, r.sha or "")) or r.method, r.parents, r.license,
                              r.likes, r.downloads, r.last_modified, r.parameters, r.sha) for r in rows]


def _sort_key(sort: str) -> Callable[[RecipeRow], Any]:
    if sort == "recent":
        return lambda r: r.last_modified.timestamp() if r.last_modified else 0.0
    return lambda r: getattr(r, sort)


def _recipe_method(repo: str, sha: str, token: str | None) -> str | None:
    """merge_method of the model's mergekit_config.yml at `sha`; None when it has none or it is unreadable."""
    from pathlib import Path

    import yaml
    from huggingface_hub import hf_hub_download

    from ..hub import hub_endpoint

    try:
        path = hf_hub_download(repo, "mergekit_config.yml", revision=sha, token=token or False,
                               endpoint=hub_endpoint())
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")[:256_000])
    except Exception:  # no recipe file, or unreadable: the row shows "?"
        return None
    method = data.get("merge_method") if isinstance(data, dict) else None
    return method if isinstance(method, str) else None
