"""Community recipes: the gallery entries read from the recipes dataset on the Hub (see merger.app.share).

Only the dataset's main branch is read (recipes whose pull requests were merged), pinned to one commit
per read and cached for CACHE_SECONDS; files are small YAML recipes under `recipes/`. A dataset that
cannot be read leaves the gallery with the shipped examples and one line saying why.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Callable

from ...errors import MergerError
from . import GalleryEntry

CACHE_SECONDS = 300.0
MAX_RECIPES = 100
MAX_FILE_BYTES = 64 * 1024
KEY_PREFIX = "community:"

_lock = threading.Lock()
_cache: dict[tuple[str, str], tuple[float, tuple[GalleryEntry, ...]]] = {}
_entries: dict[str, GalleryEntry] = {}  # every community entry seen, by key, for gallery_entry()
_failures: dict[tuple[str, str], tuple[float, str]] = {}  # (dataset, token hash) -> (when, why) of a failed read


def load_community(dataset: str, *, token: str | None = None,
                   clock: Callable[[], float] = time.monotonic) -> tuple[GalleryEntry, ...]:
    """The dataset's recipes as gallery entries (title and description from each file's header)."""
    key = (dataset, hashlib.sha256((token or "").encode()).hexdigest()[:16])
    now = clock()
    with _lock:
        hit = _cache.get(key)
        if hit and now - hit[0] < CACHE_SECONDS:
            return hit[1]
    entries = _read(dataset, token)
    with _lock:
        _cache[key] = (now, entries)
        _entries.update({e.key: e for e in entries})
    return entries


def community_entry(key: str) -> GalleryEntry | None:
    with _lock:
        return _entries.get(key)


def clear_cache() -> None:
    with _lock:
        _cache.clear()
        _failures.clear()


def _read(dataset: str, token: str | None) -> tuple[GalleryEntry, ...]:
    from huggingface_hub import hf_hub_download

    from ...hub import _api, _call, hub_endpoint
    from ..share import RECIPES_FOLDER, read_header

    api = _api(token)
    info = _call(lambda: api.dataset_info(dataset, files_metadata=True), repo_id=dataset, token=token)
    sha = str(info.sha)
    files = sorted((s.rfilename, s.size or 0) for s in info.siblings or ()
                   if s.rfilename.startswith(RECIPES_FOLDER + "/") and s.rfilename.endswith((".yml", ".yaml")))
    entries = []
    for name, size in files[:MAX_RECIPES]:
        if size > MAX_FILE_BYTES:
            continue
        path = _call(lambda name=name: hf_hub_download(dataset, name, repo_type="dataset", revision=sha,
                                                       token=token or False, endpoint=hub_endpoint()),
                     repo_id=dataset, token=token)
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        title, description = read_header(text)
        stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        entries.append(GalleryEntry(KEY_PREFIX + name, f"{title or stem} (community)",
                                    description or f"shared in {dataset}", text))
    return tuple(entries)


def safe_load_community(dataset: str, *, token: str | None = None,
                        clock: Callable[[], float] = time.monotonic) -> tuple[tuple[GalleryEntry, ...], str]:
    """(entries, note): the note says why none could be read (offline, no such dataset), else it is empty.

    A failure is remembered for CACHE_SECONDS too, so an offline app does not retry on every page load.
    """
    key = (dataset, hashlib.sha256((token or "").encode()).hexdigest()[:16])
    now = clock()
    with _lock:
        failed = _failures.get(key)
        if failed and now - failed[0] < CACHE_SECONDS:
            return (), failed[1]
    try:
        return load_community(dataset, token=token, clock=clock), ""
    except MergerError as e:
        note = f"Community recipes from {dataset} are not available: {e}"
        with _lock:
            _failures[key] = (now, note)
        return (), note
