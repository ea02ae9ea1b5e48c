"""Hub failures: transient ones retried with backoff, every other one turned into one HubError line.

The line says what went wrong and what to do about it, and never holds the token. `_call` wraps each Hub
operation of merger.hub, merger.publish and the app; `_hub_error` words an exception caught elsewhere.
"""

from __future__ import annotations

import difflib
import errno
import re
import time
from typing import Callable, TypeVar

import httpx2
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import HubError, MergerError
from .hub_env import _api, hub_cache_dir, hub_endpoint

RETRY_DELAYS: tuple[float, ...] = (1.0, 2.0, 4.0)  # waits before the 2nd, 3rd, 4th attempt of a transient failure
MAX_RETRY_AFTER = 60.0  # a rate limit asking for a longer wait is reported instead of waited out

T = TypeVar("T")


def _call(operation: Callable[[], T], *, repo_id: str | None, token: str | None, revision: str | None = None,
          verb: str = "read", reraise: type[Exception] | None = None) -> T:
    """Run one Hub operation, retrying transient failures with backoff, and turn errors into HubErrors.

    `reraise` lets a caller handle one exception type itself (e.g. "repo not found" meaning "free name").
    """
    delays = list(RETRY_DELAYS)
    while True:
        try:
            return operation()
        except Exception as e:
            if reraise is not None and isinstance(e, reraise) and not isinstance(e, GatedRepoError):
                raise
            if isinstance(e, MergerError):  # ours already: a cancel from a progress callback is not a Hub failure
                raise
            wait = _transient_wait(e)
            if wait is None or not delays:
                raise _hub_error(e, repo_id, token=token, revision=revision, verb=verb) from None
            time.sleep(max(delays.pop(0), wait))


def _root_cause(e: BaseException) -> BaseException:
    """The Hub or network error behind wrappers such as LocalEntryNotFoundError or RuntimeError."""
    seen = {id(e)}
    while isinstance(e, (LocalEntryNotFoundError, RuntimeError)) and e.__cause__ is not None and id(
            e.__cause__) not in seen:
        e = e.__cause__
        seen.add(id(e))
    return e


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _transient_wait(e: BaseException) -> float | None:
    """Seconds to wait before retrying a transient failure; None when retrying cannot help."""
    cause = _root_cause(e)
    if isinstance(cause, OfflineModeIsEnabled):
        return None
    if isinstance(cause, (httpx2.TransportError, ConnectionError, TimeoutError)):
        return 0.0
    status = _status(cause)
    if status == 429:
        retry_after = _retry_after(cause)
        return None if retry_after > MAX_RETRY_AFTER else retry_after
    if status is not None and status >= 500:
        return 0.0
    if isinstance(e, LocalEntryNotFoundError):
        return 0.0
    return None


def _retry_after(e: BaseException) -> float:
    response = getattr(e, "response", None)
    value = response.headers.get("Retry-After", "") if response is not None else ""
    return float(value) if value.strip().isdigit() else 0.0


def _hub_error(e: BaseException, repo_id: str | None, *, token: str | None, revision: str | None = None,
               verb: str = "read", after: str = "") -> HubError:
    """One line saying what went wrong and what to do; never the token."""
    web = hub_endpoint()
    cause = _root_cause(e)
    status = _status(cause)
    what = repo_id or "the Hub"
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        line = (f"the disk is full while downloading {what} into {hub_cache_dir()}; free some space or point "
                "HF_HOME to a larger disk")
    elif isinstance(cause, GatedRepoError):
        line = (f"{what} is gated: accept its licence at {web}/{what} with the account of your token "
                "(signed in), then retry")
    elif isinstance(cause, RevisionNotFoundError):
        line = (f"revision '{revision}' of {what} does not exist; use a branch, tag or commit sha listed at "
                f"{web}/{what}/commits/main")
    elif isinstance(cause, DisabledRepoError):
        line = f"{what} has been disabled on the Hub; use another model"
    elif isinstance(cause, RepositoryNotFoundError):
        hint = "" if repo_id is None else _did_you_mean(repo_id, token)
        access = ("if it is private, use a token of an account that can see it" if token else
                  "if it is private or gated, sign in (or pass --token)")
        line = f"{what} was not found on the Hub{hint}; check the spelling, or {access}"
    elif isinstance(cause, RemoteEntryNotFoundError):
        name = str(cause.response.url).rsplit("/", 1)[-1] if cause.response is not None else "a file"
        line = f"{what} has no file {name} at this revision; check the repo ID and revision"
    elif status == 401:
        line = (f"the Hub rejected your token (expired or revoked?); create a new one at {web}/settings/tokens "
                "and sign in again")
    elif status == 403:
        line = (f"your token is not allowed to {verb} {what}; use a token with "
                f"{'write' if verb != 'read' else 'read'} access to it ({web}/settings/tokens)")
    elif status == 409:
        line = (f"{what} already exists on the Hub (perhaps private, or just created by someone else); "
                "choose another name")
    elif status == 429:
        wait = _retry_after(cause)
        line = (f"the Hub is rate-limiting your requests (HTTP 429); wait {int(wait) if wait else 'a few'} "
                "seconds and retry, or sign in to get a higher limit")
    elif status is not None and status >= 500:
        line = (f"the Hub failed with a server error (HTTP {status}) while trying to {verb} {what}; "
                "retry in a few minutes")
    elif isinstance(cause, (httpx2.TransportError, ConnectionError, TimeoutError, LocalEntryNotFoundError)):
        line = f"cannot reach the Hub at {web} (network down or blocked?); check the connection and retry"
    elif isinstance(cause, ValueError) and "Invalid metadata in README.md" in str(cause):
        detail = " ".join(str(cause).split("\n")[1:2]).lstrip("- ")
        line = f"the Hub refused the model card metadata ({detail}); this is a bug, please report it"
    elif status is not None:  # an HTTP answer nobody expected (HfHubHTTPError is an OSError too: test first)
        line = (f"could not {verb} {what}: {_http_answer(cause)}; check the repo ID, revision and token's access, "
                "or report it with this line")
    elif isinstance(cause, OSError):
        line = f"could not {verb} {what}: {cause.strerror or type(cause).__name__}"
    else:
        line = f"could not {verb} {what} on the Hub ({type(cause).__name__}{f', HTTP {status}' if status else ''})"
    return HubError(_scrub(line + after, token))


def _http_answer(e: BaseException) -> str:
    """`the Hub answered HTTP 451 Unavailable For Legal Reasons to GET <url> ("its message")`: status and
    request only (the token travels in a header, never shown; a URL's query string may hold a signature)."""
    response = getattr(e, "response", None)
    status, reason = _status(e), (getattr(response, "reason_phrase", "") or "").strip()
    try:
        request = response.request if response is not None else None
    except RuntimeError:  # a response built without its request
        request = None
    asked = f" to {request.method} {str(request.url).split('?', 1)[0]}" if request is not None else ""
    message = " ".join(str(getattr(e, "server_message", "") or "").split())[:200]
    request_id = getattr(e, "request_id", None)
    return (f"the Hub answered HTTP {status}{f' {reason}' if reason else ''}{asked}"
            + (f' ("{message}")' if message else "") + (f" [request id {request_id}]" if request_id else ""))


def _did_you_mean(repo_id: str, token: str | None) -> str:
    close = suggest_repos(repo_id, token=token)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def suggest_repos(repo_id: str, *, token: str | None = None, limit: int = 3) -> list[str]:
    """Existing model IDs close to a mistyped one, from the Hub's search (empty if the search fails)."""
    namespace, _, name = repo_id.rpartition("/")
    words = sorted({w for w in re.split(r"[-_.]", name) if len(w) >= 3}, key=len, reverse=True)[:2]
    queries = ([{"author": namespace}] if namespace else []) + [{"search": w} for w in words]
    api = _api(token)
    candidates: set[str] = set()
    for query in queries:
        try:
            candidates.update(m.id for m in api.list_models(**query, limit=100))
        except (HfHubHTTPError, httpx2.HTTPError, OSError):
            continue
    lowered = {c.lower(): c for c in candidates if c.lower() != repo_id.lower()}
    close = difflib.get_close_matches(repo_id.lower(), sorted(lowered), n=limit, cutoff=0.6)
    return [lowered[c] for c in close]

