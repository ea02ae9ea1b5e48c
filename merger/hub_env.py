"""Where the Hub is, as this process sees it now: endpoint, download cache, an API client.

The endpoint (HF_ENDPOINT) and cache (HF_HUB_CACHE, HF_HOME) are read at call time, so tests and Spaces
can point them elsewhere after import. The token is always passed explicitly; None means anonymous, never
the machine's stored token (merger.hub says why).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Iterator

from huggingface_hub import HfApi

DEFAULT_ENDPOINT = "https://huggingface.co"

Progress = Callable[[int, int | None], None]  # (bytes done, bytes total or None when not known yet)


def hub_endpoint() -> str:
    """The Hub URL in effect now (HF_ENDPOINT, else the public Hub)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


_JOB_CACHE: ContextVar[Path | None] = ContextVar("merger_hub_job_cache", default=None)


@contextmanager
def job_cache(folder: str | Path) -> Iterator[Path]:
    """Within this block (in this thread), downloads go to `folder`, a cache one job owns and removes.

    On a Space each job downloads into its own folder: nothing one user fetched is ever read by another
    job (a read pinned to a commit sha is served from a shared cache without asking the Hub), and the
    disk holds no parents once the job is over.
    """
    reset = _JOB_CACHE.set(Path(folder))
    try:
        yield Path(folder)
    finally:
        _JOB_CACHE.reset(reset)


def hub_cache_dir() -> Path:
    """The download cache in effect now: the job's own (job_cache), else HF_HUB_CACHE, else HF_HOME/hub."""
    own = _JOB_CACHE.get()
    if own is not None:
        return own
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _api(token: str | None) -> HfApi:
    return HfApi(endpoint=hub_endpoint(), token=token or False)

