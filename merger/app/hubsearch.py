"""Hub model names as people type or paste them: search-as-you-type suggestions and pasted huggingface.co links.

`gradio_huggingfacehub_search` (the component gguf-my-repo uses) queries huggingface.co from the visitor's
browser, so it can neither reach a local or private Hub endpoint (HF_ENDPOINT) nor work offline. These
suggestions come from the server instead, through `HfApi.list_models(search=...)` at the endpoint in effect,
with the visitor's token (private models included), cached briefly per query.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from typing import Callable
from urllib.parse import unquote, urlparse

from ..errors import MergerError, RecipeError

MIN_QUERY = 2  # characters before the Hub is asked
LIMIT = 8  # suggestions shown
CACHE_SECONDS = 60.0
DEBOUNCE_SECONDS = 0.3  # typing pauses shorter than this are not searched (see Suggester.suggest)
_HUB_HOSTS = ("huggingface.co", "hf.co", "www.huggingface.co")
_PATH_TAIL = re.compile(r"^(tree|blob|resolve|commit)/([^/]+)")


def hub_ref(text: str | None, what: str = "the model", *, endpoint: str | None = None) -> str:
    """`org/name` (or `org/name@rev`) from what a person typed or pasted: a repo id or a model page link such as
    https://huggingface.co/org/name/tree/main. Anything else is a one-line RecipeError saying what to write."""
    value = (text or "").strip()
    if not value:
        raise RecipeError(f"{what}: type a Hub model ID like 'org/name' or paste its huggingface.co link")
    if "://" not in value and not value.startswith(tuple(f"{h}/" for h in _HUB_HOSTS)):
        return value
    url = urlparse(value if "://" in value else f"https://{value}")
    hosts = set(_HUB_HOSTS)
    if endpoint:
        hosts.add(urlparse(endpoint).netloc)
    if url.netloc not in hosts:
        raise RecipeError(f"{what}: '{value[:80]}' is not a Hugging Face model link; give 'org/name' or a "
                          "https://huggingface.co/org/name link")
    parts = [unquote(p) for p in url.path.strip("/").split("/") if p]
    if parts[:1] in (["datasets"], ["spaces"]):
        raise RecipeError(f"{what}: that link is a {parts[0][:-1]}, not a model; link a model page")
    if len(parts) < 2:
        raise RecipeError(f"{what}: the link names no model; it should look like https://huggingface.co/org/name")
    repo = "/".join(parts[:2])
    tail = _PATH_TAIL.match("/".join(parts[2:]))
    revision = tail.group(2) if tail else None
    return f"{repo}@{revision}" if revision and revision != "main" else repo


def hub_refs_in_lines(text: str | None) -> str:
    """The models box with every pasted link line turned into its repo id (other lines unchanged)."""
    out = []
    for line in (text or "").splitlines():
        stripped = line.split("#", 1)[0].strip() if "://" not in line else line.strip()
        if "://" in stripped or stripped.startswith(tuple(f"{h}/" for h in _HUB_HOSTS)):
            from ..hub import hub_endpoint

            out.append(hub_ref(stripped, "models box", endpoint=hub_endpoint()))
        else:
            out.append(line)
    return "\n".join(out)


class Suggester:
    """Model ids matching what is typed, from the Hub's search; one instance serves every visitor."""

    def __init__(self, *, ttl: float = CACHE_SECONDS, clock: Callable[[], float] = time.monotonic,
                 debounce: float = DEBOUNCE_SECONDS) -> None:
        self.ttl, self.clock, self.debounce = ttl, clock, debounce
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], tuple[float, list[str]]] = {}
        self._latest: dict[str, int] = {}  # per visitor: the number of their newest query

    def suggest(self, query: str | None, *, token: str | None = None, visitor: str = "") -> list[str] | None:
        """Up to LIMIT model ids containing `query`, most downloaded first; [] below MIN_QUERY characters.
        None when a newer query of the same visitor arrived during the debounce pause (its answer wins)."""
        term = (query or "").strip()
        if "://" in term or term.startswith(tuple(f"{h}/" for h in _HUB_HOSTS)):
            try:
                term = hub_ref(term).split("@")[0]
            except MergerError:
                return []
        if len(term) < MIN_QUERY:
            return []
        with self._lock:
            ticket = self._latest.get(visitor, 0) + 1
            self._latest[visitor] = ticket
        if self.debounce:
            time.sleep(self.debounce)
            with self._lock:
                if self._latest.get(visitor) != ticket:
                    return None
        key = (term.lower(), hashlib.sha256((token or "").encode()).hexdigest()[:16])
        now = self.clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit and now - hit[0] < self.ttl:
                return hit[1]
        found = _search(term, token)
        with self._lock:
            self._cache = {k: v for k, v in self._cache.items() if now - v[0] < self.ttl}
            self._cache[key] = (now, found)
        return found


def _search(term: str, token: str | None) -> list[str]:
    from ..hub import _api, _call

    api = _api(token)
    return _call(lambda: [m.id for m in api.list_models(search=term, sort="downloads", limit=LIMIT)],
                 repo_id=None, token=token)
