"""A local Hugging Face Hub for tests: the HTTP endpoints `huggingface_hub` 2.4 calls, on 127.0.0.1.

The real client runs unchanged against it (set `endpoint=` or HF_ENDPOINT, and HF_HUB_DISABLE_XET=1 so
uploads take the preupload + LFS "basic" + commit path). Repos live in memory with real commit shas
per commit; users, organisations and tokens (read or write) are configurable; gated and private repos
behave as on the Hub, with its error headers, so the client raises GatedRepoError,
RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError.

Tests read counters (requests per endpoint kind, bytes and byte ranges served per file) and inject
faults per endpoint kind for N requests: 401, 403, gated, 404s, 409, 429 with Retry-After, 500, and a
connection dropped in the middle of the body (of a file or of a byte range of it, after `cut_after`
bytes or half of them). `bandwidth` (bytes/s, shared by all connections) paces file downloads like a
real network link, for benchmarks.
"""

from __future__ import annotations

import base64
import collections
import functools
import hashlib
import itertools
import json
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

from tests import hubjobs

KINDS = ("whoami", "create", "delete", "info", "tree", "paths_info", "resolve_head", "resolve_get",
         "preupload", "commit", "lfs_batch", "lfs_upload", "lfs_verify", "validate_yaml", "search",
         "auth_check", "dataset_info", *hubjobs.KINDS)
FAULTS = ("unauthorized", "forbidden", "gated", "repo_not_found", "entry_not_found", "revision_not_found",
          "conflict", "rate_limit", "server_error", "drop", "bad_request", "legal")
WRITE_ROLES = ("admin", "write", "contributor")

# The Hub's licence identifiers (https://huggingface.co/docs/hub/repositories-licenses).
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0
cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0
cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0
cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0
gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl
apple-amlr mpl-2.0 odc-by odbl openmdw-1.0 openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl
lgpl-lr deepfloyd-if-license fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2 llama3.3
llama4 gemma unknown other
""".split())
# A subset of the Hub's pipeline tags: the ones a language-model repo can carry.
HUB_PIPELINE_TAGS = frozenset("""
text-generation text2text-generation fill-mask feature-extraction text-classification token-classification
question-answering summarization translation sentence-similarity zero-shot-classification
image-text-to-text any-to-any
""".split())
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_LICENSE_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack",
                 ".model", ".zip", ".tar", ".gz", ".npy", ".npz")
_REGULAR_MAX_BYTES = 10 * 1024 * 1024


def git_blob_oid(data: bytes) -> str:
    """git's object id of a blob, as the Hub reports it for regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Blob:
    """One file's content, stored as a regular git blob or as an LFS object."""

    data: bytes
    lfs: bool

    @functools.cached_property
    def sha256(self) -> str:  # computed once: every download and range request reports it in its headers
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:
        """The id the tree listing reports: git oid of the blob, or of the LFS pointer."""
        return git_blob_oid(lfs_pointer(self.sha256, len(self.data)) if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else git_blob_oid(self.data)


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    files: Mapping[str, Blob]
    message: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: str | bool = False
    allowed_users: set[str] = field(default_factory=set)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    likes: int = 0
    downloads: int = 0

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[-2]  # dataset repos are keyed "datasets/<namespace>/<name>"

    def head(self, branch: str = "main") -> Commit:
        return self.commits[self.branches[branch]]

    def at(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        matches = [c for sha, c in self.commits.items() if len(revision) >= 7 and sha.startswith(revision)]
        return matches[0] if len(matches) == 1 else None


@dataclass
class Fault:
    kind: str
    fault: str
    remaining: int | None
    retry_after: int
    repo: str | None
    path: str | None
    cut_after: int | None = None  # "drop" of a file download: bytes sent before the cut (None: half)


@dataclass(frozen=True)
class Token:
    user: str
    role: str  # "read", "write" or "fineGrained"
    writable: frozenset[str] = frozenset()  # fineGrained: namespaces with the repo.write permission


class HubStats:
    """Counters tests assert on: requests per kind, bytes and byte ranges served per (repo, path)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: collections.Counter[str] = collections.Counter()
        self.bytes_served: collections.Counter[tuple[str, str]] = collections.Counter()
        self.ranges: dict[tuple[str, str], list[tuple[int, int]]] = collections.defaultdict(list)

    def count(self, kind: str) -> None:
        with self.lock:
            self.requests[kind] += 1

    def served(self, repo: str, path: str, start: int, end: int) -> None:
        """Record bytes [start, end) of a file as sent on the wire."""
        with self.lock:
            self.bytes_served[(repo, path)] += end - start
            self.ranges[(repo, path)].append((start, end))

    def total_bytes(self, repo: str | None = None) -> int:
        with self.lock:
            return sum(n for (r, _), n in self.bytes_served.items() if repo is None or r == repo)


class _HubError(Exception):
    """An HTTP error answer, with the Hub's X-Error-Code / X-Error-Message headers."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: Mapping[str, str] | None = None, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})
        if commit:
            self.headers["X-Repo-Commit"] = commit


class HubServer:
    """In-memory Hub on a random free port of 127.0.0.1; use as a context manager or start()/stop().

    Default identities: user `alice` (member of org `acme` with write role and of `readers` with read
    role), user `bob`; tokens `hf_alice_write`, `hf_alice_read` (read-only), `hf_bob_write`.
    """

    def __init__(self, *, users: Mapping[str, Mapping[str, str]] | None = None,
                 tokens: Mapping[str, tuple[str, str]] | None = None, bandwidth: float | None = None) -> None:
        self.users: dict[str, dict[str, str]] = {k: dict(v) for k, v in (users or {
            "alice": {"acme": "write", "readers": "read"}, "bob": {}}).items()}
        self.tokens: dict[str, Token] = {t: Token(u, r) for t, (u, r) in (tokens or {
            "hf_alice_write": ("alice", "write"), "hf_alice_read": ("alice", "read"),
            "hf_bob_write": ("bob", "write")}).items()}
        self.repos: dict[str, Repo] = {}
        self.stats = HubStats()
        self.lock = threading.RLock()
        self._faults: list[Fault] = []
        self._pending_lfs: dict[str, str] = {}  # upload signature -> expected sha256
        self._lfs_store: dict[str, bytes] = {}
        self._clock = itertools.count()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.pulls: dict[str, list[PullRequest]] = {}  # repo key -> its pull requests, numbered from 1
        self.bandwidth = bandwidth
        self._pace_lock = threading.Lock()
        self._pace_clock = 0.0  # when the link is free again (time.monotonic), with `bandwidth`
        self.jobs = hubjobs.JobsHost(self)  # Hugging Face Jobs: local subprocesses (tests/hubjobs.py)

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the Hub server is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        handler = type("Handler", (self._handler_class(),), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hubserver",
                                        daemon=True)
        self._thread.start()
        return self

    def _handler_class(self) -> type["_Handler"]:
        """The request handler; a subclass of HubServer may extend it with endpoints of its own."""
        return _Handler

    def stop(self) -> None:
        self.jobs.close()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ identities, repos, files

    def add_user(self, name: str, orgs: Mapping[str, str] | None = None) -> None:
        self.users[name] = dict(orgs or {})

    def add_token(self, token: str, user: str, role: str = "write", *, writable: Iterable[str] = ()) -> None:
        """Register a token; a "fineGrained" one may write only to the `writable` namespaces."""
        self.tokens[token] = Token(user, role, frozenset(writable))

    def create_repo(self, repo_id: str, *, private: bool = False, gated: str | bool = False,
                    allowed_users: Iterable[str] = ()) -> Repo:
        """Create an empty repo (one initial commit with .gitattributes, as the Hub does)."""
        with self.lock:
            if repo_id in self.repos:
                raise ValueError(f"{repo_id} exists")
            repo = Repo(repo_id, private=private, gated=gated, allowed_users=set(allowed_users),
                        created_at=self._now())
            self.repos[repo_id] = repo
            self._commit(repo, {".gitattributes": Blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
                                                       False)}, "initial commit")
            return repo

    def commit_files(self, repo_id: str, files: Mapping[str, bytes], *, delete: Iterable[str] = (),
                     message: str = "Upload files") -> str:
        """Commit files straight into storage (creating a public repo if needed); returns the commit sha."""
        with self.lock:
            repo = self.repos.get(repo_id) or self.create_repo(repo_id)
            tree = dict(repo.head().files)
            for path in delete:
                tree.pop(path, None)
            for path, data in files.items():
                tree[path] = Blob(bytes(data), _is_lfs(path, bytes(data)))
            return self._commit(repo, tree, message).sha

    def upload_folder(self, folder: str | Path, repo_id: str, *, private: bool = False,
                      gated: str | bool = False, allowed_users: Iterable[str] = (),
                      message: str = "Upload folder") -> str:
        """Publish a local folder as a repo; returns the commit sha."""
        root = Path(folder)
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        with self.lock:
            if repo_id not in self.repos:
                self.create_repo(repo_id, private=private, gated=gated, allowed_users=allowed_users)
            return self.commit_files(repo_id, files, message=message)

    def file_bytes(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        return self.repos[repo_id].at(revision).files[path].data

    def repo_files(self, repo_id: str, revision: str = "main") -> list[str]:
        return sorted(self.repos[repo_id].at(revision).files)

    def commit_history(self, repo_id: str) -> list[Commit]:
        """Commits of main, newest first."""
        repo = self.repos[repo_id]
        out, sha = [], repo.branches["main"]
        while sha:
            out.append(repo.commits[sha])
            sha = repo.commits[sha].parent
        return out

    # ------------------------------------------------------------------ community sharing: popularity, PRs

    def set_popularity(self, repo_id: str, *, likes: int = 0, downloads: int = 0) -> None:
        """What list_models sorts by besides dates (a new repo has none)."""
        with self.lock:
            self.repos[repo_id].likes, self.repos[repo_id].downloads = likes, downloads

    def pull_requests(self, repo_key: str) -> list["PullRequest"]:
        """Pull requests of a repo ("datasets/<ns>/<name>" for a dataset), oldest first."""
        with self.lock:
            return list(self.pulls.get(repo_key, ()))

    def pr_files(self, repo_key: str, num: int) -> dict[str, bytes]:
        """The files of a pull request's head."""
        repo = self.repos[repo_key]
        return {p: b.data for p, b in repo.head(f"refs/pr/{num}").files.items()}

    def merge_pull(self, repo_key: str, num: int) -> str:
        """Merge a pull request into main, as its maintainer would on the Hub; returns the new main sha."""
        with self.lock:
            repo = self.repos[repo_key]
            pull = self.pulls[repo_key][num - 1]
            tree = dict(repo.head().files)
            base = repo.commits[pull.base]
            head = repo.head(pull.ref)
            for path in set(base.files) | set(head.files):  # the PR's changes, applied onto today's main
                if path not in head.files:
                    tree.pop(path, None)
                elif base.files.get(path) != head.files[path]:
                    tree[path] = head.files[path]
            pull.status = "merged"
            return self._commit(repo, tree, f"Merge pull request #{num}: {pull.title}").sha

    def _open_pull(self, repo: Repo, tree: Mapping[str, Blob], title: str, description: str, author: str,
                   *, base: str) -> "PullRequest":
        with self.lock:
            pulls = self.pulls.setdefault(repo.repo_id, [])
            pull = PullRequest(len(pulls) + 1, title, description, author, repo.branches[base])
            self._commit(repo, tree, title, branch=pull.ref, parent=pull.base)
            pulls.append(pull)
            return pull

    # ------------------------------------------------------------------ faults

    def inject(self, kind: str, fault: str, *, times: int | None = 1, retry_after: int = 1,
               repo: str | None = None, path: str | None = None, cut_after: int | None = None) -> None:
        """Answer the next `times` requests of `kind` ("*" = any) with `fault`; times=None = until cleared.

        A "drop" of a file download sends `cut_after` bytes of the answer (default: half) and cuts.
        """
        if kind != "*" and kind not in KINDS:
            raise ValueError(f"unknown endpoint kind {kind!r}; one of {KINDS}")
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")
        with self.lock:
            self._faults.append(Fault(kind, fault, times, retry_after, repo, path, cut_after))

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def _take_fault(self, kind: str, repo: str | None, path: str | None) -> Fault | None:
        with self.lock:
            for f in self._faults:
                if (f.kind in ("*", kind) and (f.repo is None or f.repo == repo)
                        and (f.path is None or f.path == path) and f.remaining != 0):
                    if f.remaining is not None:
                        f.remaining -= 1
                    return f
        return None

    # ------------------------------------------------------------------ internals

    def _now(self) -> str:  # microseconds, so "sort by recency" orders commits made within one second
        now = time.time()
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"

    def _commit(self, repo: Repo, tree: Mapping[str, Blob], message: str, branch: str = "main",
                parent: str | None = None) -> Commit:
        parent = parent or repo.branches.get("main")
        listing = json.dumps({p: b.oid for p, b in sorted(tree.items())}).encode()
        sha = hashlib.sha1(b"%s\n%s\n%s\n%d" % ((parent or "").encode(), listing, message.encode(),
                                                 next(self._clock))).hexdigest()
        commit = Commit(sha, parent, dict(tree), message, self._now())
        repo.commits[sha] = commit
        repo.branches[branch] = sha
        return commit

    def _can_read(self, repo: Repo, token: Token | None) -> bool:
        if not repo.private:
            return True
        return token is not None and (token.user == repo.namespace or repo.namespace in self.users.get(token.user, {}))

    def _can_write_namespace(self, namespace: str, token: Token | None) -> bool:
        if token is None or token.role == "read" or (token.role == "fineGrained" and namespace not in token.writable):
            return False
        return token.user == namespace or self.users.get(token.user, {}).get(namespace) in WRITE_ROLES

    def _repo_for_read(self, repo_id: str, token: Token | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or not self._can_read(repo, token):
            raise _not_found(repo_id, token)
        return repo

    def _revision(self, repo: Repo, revision: str) -> Commit:
        commit = repo.at(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _check_gate(self, repo: Repo, token: Token | None) -> None:
        if not repo.gated or (token is not None and (token.user in repo.allowed_users
                                                     or self._can_write_namespace(repo.namespace, token))):
            return
        if token is None:
            raise _HubError(401, f"Access to model {repo.repo_id} is restricted. You must have access to it "
                                 "and be authenticated to access it. Please log in.", "GatedRepo")
        raise _HubError(403, f"Access to model {repo.repo_id} is restricted and you are not in the authorized "
                             f"list. Visit {self.url}/{repo.repo_id} to ask for access.", "GatedRepo")

    def model_json(self, repo: Repo, commit: Commit, *, blobs: bool) -> dict[str, Any]:
        card = _card_data(commit.files.get("README.md"))
        siblings = []
        for path, blob in sorted(commit.files.items()):
            entry: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry.update(size=len(blob.data), blobId=blob.oid)
                if blob.lfs:
                    entry["lfs"] = {"sha256": blob.sha256, "size": len(blob.data), "pointerSize": 134}
            siblings.append(entry)
        tags = list(card.get("tags") or []) if isinstance(card.get("tags"), list) else []
        return {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "modelId": repo.repo_id, "author": repo.namespace, "sha": commit.sha, "lastModified": commit.date,
            "createdAt": repo.created_at, "private": repo.private, "gated": repo.gated, "disabled": False,
            "downloads": 0, "likes": 0, "tags": tags, "pipeline_tag": card.get("pipeline_tag"),
            "library_name": card.get("library_name"), "cardData": card or None, "siblings": siblings,
            "spaces": [], "usedStorage": sum(len(b.data) for b in commit.files.values()),
        }


def _not_found(repo_id: str, token: Token | None) -> _HubError:
    if token is None:
        return _HubError(401, "Invalid username or password.", "RepoNotFound")
    return _HubError(404, "Repository not found", "RepoNotFound")


def _is_lfs(path: str, data: bytes) -> bool:
    return (path.lower().endswith(_LFS_SUFFIXES) or len(data) > _REGULAR_MAX_BYTES or b"\0" in data[:512])


def _card_data(blob: Blob | None) -> dict[str, Any]:
    if blob is None:
        return {}
    match = _YAML_BLOCK.search(blob.data.decode("utf-8", "replace"))
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def validate_card_metadata(content: str) -> tuple[list[str], list[str]]:
    """The Hub's model card metadata rules for the fields a merged model uses: (errors, warnings)."""
    match = _YAML_BLOCK.search(content)
    if not match:
        return [], ["Empty or missing yaml metadata in repo card"]
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError as e:
        return [f"Invalid YAML in metadata: {' '.join(str(e).split())}"], []
    if data is None:
        return [], ["Empty or missing yaml metadata in repo card"]
    if not isinstance(data, dict):
        return ["Metadata must be a YAML mapping"], []
    errors: list[str] = []

    def strings(key: str, value: Any) -> list[str] | None:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
            errors.append(f'"{key}" must be a string or a list of strings')
            return None
        return items

    license_ = data.get("license")
    if license_ is not None:
        for value in strings("license", license_) or []:
            if value not in HUB_LICENSES:
                errors.append(f'"license" must be one of the Hub licence identifiers; "{value}" is not')
        if license_ == "other" and not data.get("license_name"):
            errors.append('"license_name" is required when "license" is "other"')
    if "license_name" in data and (not isinstance(data["license_name"], str)
                                    or not _LICENSE_NAME.match(data["license_name"])):
        errors.append('"license_name" must be a lowercase identifier like "my-license-1.0"')
    if "license_link" in data and not isinstance(data["license_link"], str):
        errors.append('"license_link" must be a string (a URL or a file in the repo)')
    if "base_model" in data:
        for value in strings("base_model", data["base_model"]) or []:
            if not _REPO_ID.match(value) or "--" in value or ".." in value:
                errors.append(f'"base_model" must be a model id like "org/name"; "{value}" is not')
    relation = data.get("base_model_relation")
    if relation is not None:
        if relation not in BASE_MODEL_RELATIONS:
            errors.append(f'"base_model_relation" must be one of {", ".join(BASE_MODEL_RELATIONS)}')
        if "base_model" not in data:
            errors.append('"base_model_relation" needs "base_model"')
    if "tags" in data:
        strings("tags", data["tags"])
    if "pipeline_tag" in data and data["pipeline_tag"] not in HUB_PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" must be a Hub task; "{data["pipeline_tag"]}" is not')
    if "library_name" in data and not isinstance(data["library_name"], str):
        errors.append('"library_name" must be a string')
    for key in ("datasets", "language", "metrics"):
        if key in data:
            strings(key, data[key])
    return errors, []


# ====================================================================== community sharing
# What the recipe browser, the lineage reader and "Publish recipe" call: list_models with tag filters,
# parameter-count ranges, sort keys and expanded fields; dataset repos (info, tree, files, commits);
# commits with create_pr=1 (opened by any signed-in user, on refs/pr/N).

@dataclass
class PullRequest:
    num: int
    title: str
    description: str
    author: str
    base: str  # the commit the pull request was opened against
    status: str = "open"

    @property
    def ref(self) -> str:
        return f"refs/pr/{self.num}"


_SORT_KEYS = {"likes": lambda r, c: r.likes, "downloads": lambda r, c: r.downloads,
              "lastModified": lambda r, c: c.date, "createdAt": lambda r, c: r.created_at,
              "trendingScore": lambda r, c: r.likes}
_PARAM_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_DTYPE_NAMES = {"F64": "F64", "F32": "F32", "F16": "F16", "BF16": "BF16", "I64": "I64", "I32": "I32",
                "I16": "I16", "I8": "I8", "U8": "U8", "BOOL": "BOOL"}


def hub_tags(commit: Commit) -> list[str]:
    """The tags the Hub derives for a model: card tags, library, format, model_type, task, licence, lineage."""
    card = _card_data(commit.files.get("README.md"))
    tags = [t for t in card.get("tags") or [] if isinstance(t, str)] if isinstance(card.get("tags"), list) else []
    derived: list[str] = []
    if isinstance(card.get("library_name"), str):
        derived.append(card["library_name"])
    if any(p.endswith(".safetensors") for p in commit.files):
        derived.append("safetensors")
    config = commit.files.get("config.json")
    if config is not None:
        try:
            model_type = json.loads(config.data).get("model_type")
        except ValueError:
            model_type = None
        if isinstance(model_type, str):
            derived.append(model_type)
    if isinstance(card.get("pipeline_tag"), str):
        derived.append(card["pipeline_tag"])
    bases = card.get("base_model")
    bases = [bases] if isinstance(bases, str) else bases if isinstance(bases, list) else []
    relation = card.get("base_model_relation") or ("merge" if len(bases) > 1 else "finetune")
    for base in bases:
        derived += [f"base_model:{base}", f"base_model:{relation}:{base}"]
    licenses = card.get("license")
    for lic in [licenses] if isinstance(licenses, str) else licenses if isinstance(licenses, list) else []:
        derived.append(f"license:{lic}")
    return list(dict.fromkeys(tags + derived))


def safetensors_parameters(commit: Commit) -> dict[str, int]:
    """Parameters per dtype summed over the safetensors files' headers (what the Hub shows as the size)."""
    counts: collections.Counter[str] = collections.Counter()
    for path, blob in commit.files.items():
        if not path.endswith(".safetensors") or len(blob.data) < 8:
            continue
        n = int.from_bytes(blob.data[:8], "little")
        try:
            header = json.loads(blob.data[8:8 + n])
        except ValueError:
            continue
        for name, entry in header.items():
            if name != "__metadata__":
                size = 1
                for d in entry["shape"]:
                    size *= d
                counts[_DTYPE_NAMES.get(entry["dtype"], entry["dtype"])] += size
    return dict(counts)


def _parameter_range(text: str) -> tuple[float, float]:
    """"min:6B,max:128B" -> (6e9, 128e9); either side may be missing."""
    low, high = 0.0, float("inf")
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(min|max):([0-9.]+)([KMBT]?)", part, re.IGNORECASE)
        if not m:
            raise _HubError(400, f"Invalid num_parameters {text!r}: use min:6B,max:128B")
        value = float(m.group(2)) * _PARAM_UNITS[m.group(3).upper()]
        low, high = (value, high) if m.group(1).lower() == "min" else (low, value)
    return low, high


class _CommunityEndpoints:
    """Endpoints of the community-sharing block, mixed into the request handler."""

    hub: HubServer
    query: dict[str, list[str]]

    @property
    def _create_pr(self) -> bool:
        return (self.query.get("create_pr") or [""])[0] in ("1", "true", "True")

    def _check_commit_rights(self, repo: Repo, token: Token | None) -> None:
        """Writers commit to any branch; any signed-in user may open a pull request on a repo they can read."""
        if self._create_pr:
            if token is None:
                raise _HubError(401, "You must be authenticated to open a pull request")
            return
        if not self.hub._can_write_namespace(repo.namespace, token):
            raise _HubError(403, f"You don't have the rights to write to {repo.repo_id}")

    def search(self, body: bytes) -> None:  # GET /api/models
        token = self._token()  # type: ignore[attr-defined]
        q = self.query
        term = (q.get("search") or [""])[0].lower()
        author = (q.get("author") or [None])[0]
        wanted = q.get("filter") or []
        pipeline = (q.get("pipeline_tag") or [None])[0]
        low, high = _parameter_range((q.get("num_parameters") or [""])[0])
        limit = int((q.get("limit") or ["1000"])[0])
        sort = (q.get("sort") or [None])[0]
        if sort is not None and sort not in _SORT_KEYS:
            raise _HubError(400, f"Invalid sort {sort!r}")
        found = []
        with self.hub.lock:
            for key, repo in sorted(self.hub.repos.items()):
                if key.startswith("datasets/") or not self.hub._can_read(repo, token):
                    continue
                commit = repo.head()
                tags = hub_tags(commit)
                if term not in key.lower() or author not in (None, repo.namespace):
                    continue
                if not all(t in tags for t in wanted) or (pipeline and pipeline not in tags):
                    continue
                total = sum(safetensors_parameters(commit).values())
                if (low > 0 or high < float("inf")) and not low <= total <= high:
                    continue
                found.append((repo, commit, tags))
        if sort:
            found.sort(key=lambda item: _SORT_KEYS[sort](item[0], item[1]), reverse=True)
        self._json([self._listing(r, c, t) for r, c, t in found[:limit]])  # type: ignore[attr-defined]

    def _listing(self, repo: Repo, commit: Commit, tags: list[str]) -> dict[str, Any]:
        """One model of a listing: the default fields, `full`, `cardData`, or exactly the `expand`ed ones."""
        q = self.query
        card = _card_data(commit.files.get("README.md"))
        params = safetensors_parameters(commit)
        every: dict[str, Any] = {
            "author": repo.namespace, "likes": repo.likes, "downloads": repo.downloads, "tags": tags,
            "private": repo.private, "gated": repo.gated, "disabled": False, "sha": commit.sha,
            "lastModified": commit.date, "createdAt": repo.created_at, "cardData": card or None,
            "pipeline_tag": card.get("pipeline_tag"), "library_name": card.get("library_name"),
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            "safetensors": {"parameters": params, "total": sum(params.values())} if params else None,
        }
        if q.get("expand"):
            keys = set(q["expand"])
        else:
            keys = {"likes", "downloads", "tags", "private", "pipeline_tag", "library_name", "createdAt"}
            if (q.get("full") or [""])[0].lower() == "true":
                keys |= {"author", "sha", "lastModified", "siblings", "gated", "disabled"}
            if (q.get("cardData") or [""])[0].lower() == "true":
                keys.add("cardData")
        out = {"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
               "modelId": repo.repo_id}
        out.update({k: v for k, v in every.items() if k in keys})
        return out

    def dataset_info(self, body: bytes, repo: str, rev: str | None = None) -> None:
        token = self._token()  # type: ignore[attr-defined]
        hub_repo = self.hub._repo_for_read(repo, token)
        commit = self.hub._revision(hub_repo, rev or "main")
        card = _card_data(commit.files.get("README.md"))
        self._json({  # type: ignore[attr-defined]
            "_id": hashlib.md5(repo.encode()).hexdigest()[:24], "id": repo.split("/", 1)[1],
            "author": hub_repo.namespace, "sha": commit.sha, "lastModified": commit.date,
            "createdAt": hub_repo.created_at, "private": hub_repo.private, "gated": hub_repo.gated,
            "disabled": False, "downloads": hub_repo.downloads, "likes": hub_repo.likes,
            "tags": list(card.get("tags") or []) if isinstance(card.get("tags"), list) else [],
            "cardData": card or None, "siblings": [
                {"rfilename": p, **({"size": len(b.data), "blobId": b.oid}
                                    if (self.query.get("blobs") or [""])[0].lower() == "true" else {})}
                for p, b in sorted(commit.files.items())]})


_DATASET = r"(?P<dataset>[^/]+/[^/]+?)"
_DATASET_RESOLVE = re.compile(rf"^/datasets/{_DATASET}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_DATASET_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(rf"^/api/datasets/{_DATASET}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$"), "tree"),
    ("POST", re.compile(rf"^/api/datasets/{_DATASET}/paths-info/(?P<rev>[^/]+)$"), "paths_info"),
    ("POST", re.compile(rf"^/api/datasets/{_DATASET}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/datasets/{_DATASET}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/datasets/{_DATASET}/revision/(?P<rev>[^/]+)$"), "dataset_info"),
    ("GET", re.compile(rf"^/api/datasets/{_DATASET}$"), "dataset_info"),
    ("POST", re.compile(rf"^/datasets/{_DATASET}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("POST", re.compile(rf"^/datasets/{_DATASET}\.git/info/lfs/objects/verify$"), "lfs_verify"),
    ("HEAD", _DATASET_RESOLVE, "resolve"),
    ("GET", _DATASET_RESOLVE, "resolve"),
]
# ====================================================================== end of community sharing


class _Handler(hubjobs.JobsEndpoints, _CommunityEndpoints, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
        return

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ------------------------------------------------------------------ plumbing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _token(self) -> Token | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        value = auth.split(" ", 1)[1] if " " in auth else auth
        token = self.hub.tokens.get(value.strip())
        if token is None:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return token

    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-Id", secrets.token_hex(6))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            if self.hub.bandwidth and content_type == "application/octet-stream":
                self._paced_write(body)
            else:
                self.wfile.write(body)

    def _paced_write(self, body: bytes, chunk: int = 1 << 20) -> None:
        """Write a file's bytes no faster than the server's shared `bandwidth`, as a network link would."""
        view = memoryview(body)
        for i in range(0, len(view), chunk):
            part = view[i:i + chunk]
            with self.hub._pace_lock:
                now = time.monotonic()
                start = max(now, self.hub._pace_clock)
                self.hub._pace_clock = start + len(part) / self.hub.bandwidth
            if start > now:
                time.sleep(start - now)
            self.wfile.write(part)

    def _json(self, data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, err: _HubError) -> None:
        headers = dict(err.headers)
        if err.code:
            headers["X-Error-Code"] = err.code
        headers["X-Error-Message"] = err.message
        self._json({"error": err.message}, err.status, headers)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        try:
            body = self._body() if method in ("POST", "PUT", "DELETE") else b""
            route = self._find_route(method, split.path)
            if route is None:
                self._json({"error": f"no route {method} {split.path}"}, 404)
                return
            kind, handler, params = route
            self.hub.stats.count(kind)
            fault = self.hub._take_fault(kind, params.get("repo"), params.get("path"))
            if fault is not None:
                self._fault(fault, kind, params)
                return
            getattr(self, handler)(body=body, **params)
        except _HubError as e:
            self._error(e)

    def _find_route(self, method: str, path: str) -> tuple[str, str, dict[str, str]] | None:
        return _route(method, path)

    def _fault(self, fault: Fault, kind: str, params: Mapping[str, str]) -> None:
        name = params.get("repo") or "the repository"
        if fault.fault == "drop":
            if kind == "resolve_get":
                self._serve_partial(params, fault.cut_after)
            self._drop()
            return
        errors = {
            "unauthorized": _HubError(401, "Invalid credentials in Authorization header"),
            "forbidden": _HubError(403, f"You don't have the rights to access {name}"),
            "gated": _HubError(403, f"Access to model {name} is restricted and you are not in the authorized "
                                    f"list. Visit {self.hub.url}/{name} to ask for access.", "GatedRepo"),
            "repo_not_found": _HubError(404, "Repository not found", "RepoNotFound"),
            "entry_not_found": _HubError(404, "Entry not found", "EntryNotFound"),
            "revision_not_found": _HubError(404, "Invalid rev id", "RevisionNotFound"),
            "conflict": _HubError(409, "A conflicting operation is in progress"),
            "rate_limit": _HubError(429, "You have been rate-limited; retry later",
                                    headers={"Retry-After": str(fault.retry_after),
                                             "RateLimit": f'"api";r=0;t={fault.retry_after}',
                                             "RateLimit-Policy": '"fixed window";"api";q=500;w=300'}),
            "server_error": _HubError(500, "Internal Error - We're working hard to fix this as soon as possible!"),
            # answers no client code expects: the error must still say the status and the request
            "bad_request": _HubError(400, "Bad request: unexpected parameter"),
            "legal": _HubError(451, f"{name} is unavailable for legal reasons"),
        }
        self._error(errors[fault.fault])

    def _serve_partial(self, params: Mapping[str, str], cut_after: int | None = None) -> None:
        """Send headers for the whole answer and part of its bytes (the caller then cuts the connection)."""
        hub_repo = self.hub.repos.get(params["repo"])
        commit = hub_repo.at(params["rev"]) if hub_repo else None
        blob = commit.files.get(params["path"]) if commit else None
        if blob is None:
            return
        start, end = _byte_range(self.headers.get("Range"), len(blob.data))
        half = start + (end - start) // 2 if cut_after is None else min(end, start + cut_after)
        self.send_response(206 if self.headers.get("Range") else 200)
        self.send_header("Content-Length", str(end - start))
        if self.headers.get("Range"):
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(blob.data)}")
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.wfile.write(blob.data[start:half])
        self.hub.stats.served(params["repo"], params["path"], start, half)

    # ------------------------------------------------------------------ endpoints

    def whoami(self, body: bytes) -> None:
        token = self._token()
        if token is None:
            raise _HubError(401, "Invalid credentials in Authorization header")
        orgs = [{"type": "org", "name": org, "fullname": org, "roleInOrg": role, "isEnterprise": False}
                for org, role in sorted(self.hub.users.get(token.user, {}).items())]
        access: dict[str, Any] = {"displayName": "test", "role": token.role}
        if token.role == "fineGrained":
            access["fineGrained"] = {"global": [], "scoped": [
                {"entity": {"type": "user" if ns == token.user else "org", "name": ns},
                 "permissions": ["repo.content.read", "repo.write"]} for ns in sorted(token.writable)]}
        self._json({"type": "user", "id": hashlib.md5(token.user.encode()).hexdigest()[:24], "name": token.user,
                    "fullname": token.user.title(), "isPro": False, "orgs": orgs,
                    "auth": {"type": "access_token", "accessToken": access}})

    def create(self, body: bytes) -> None:
        token = self._token()
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") not in ("model", "dataset"):
            raise _HubError(400, "This test Hub only hosts models and datasets")
        namespace = payload.get("organization") or (token.user if token else None)
        repo_id = f"{namespace}/{payload.get('name')}"
        key = repo_id if payload.get("type", "model") == "model" else f"datasets/{repo_id}"
        if token is None:
            raise _HubError(401, "You must be authenticated to create a repo")
        if not self.hub._can_write_namespace(namespace, token):
            raise _HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
            raise _HubError(400, f"Invalid repo name {repo_id}")
        with self.hub.lock:
            if key in self.hub.repos:
                self._json({"error": "You already created this repo", "url": f"{self.hub.url}/{key}"}, 409)
                return
            visibility = payload.get("visibility")
            self.hub.create_repo(key, private=visibility == "private" or bool(payload.get("private")))
        self._json({"url": f"{self.hub.url}/{key}", "name": repo_id, "id": repo_id})

    def delete(self, body: bytes) -> None:
        token = self._token()
        payload = json.loads(body or b"{}")
        namespace = payload.get("organization") or (token.user if token else None)
        repo_id = f"{namespace}/{payload.get('name')}"
        if payload.get("type", "model") == "dataset":
            repo_id = f"datasets/{repo_id}"
        repo = self.hub._repo_for_read(repo_id, token)
        if not self.hub._can_write_namespace(repo.namespace, token):
            raise _HubError(403, f"You don't have the rights to delete {repo_id}")
        with self.hub.lock:
            del self.hub.repos[repo_id]
        self._send(200)

    def info(self, body: bytes, repo: str, rev: str | None = None) -> None:
        token = self._token()
        hub_repo = self.hub._repo_for_read(repo, token)
        commit = self.hub._revision(hub_repo, rev or "main")
        blobs = (self.query.get("blobs") or ["false"])[0].lower() == "true"
        self._json(self.hub.model_json(hub_repo, commit, blobs=blobs))

    def tree(self, body: bytes, repo: str, rev: str, path: str | None = None) -> None:
        token = self._token()
        commit = self.hub._revision(self.hub._repo_for_read(repo, token), rev)
        prefix = path.strip("/") + "/" if path else ""
        recursive = (self.query.get("recursive") or ["false"])[0].lower() == "true"
        entries: dict[str, dict[str, Any]] = {}
        for file_path, blob in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix):].split("/")
            for depth in range(1, len(rest)):
                folder = prefix + "/".join(rest[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": git_blob_oid(folder.encode()),
                                                "path": folder})
            if recursive or len(rest) == 1:
                entries[file_path] = _file_entry(file_path, blob)
        if prefix and not entries:
            raise _HubError(404, f"{path} does not exist", "EntryNotFound", commit=commit.sha)
        self._json(list(entries.values()))

    def paths_info(self, body: bytes, repo: str, rev: str) -> None:
        token = self._token()
        commit = self.hub._revision(self.hub._repo_for_read(repo, token), rev)
        form = parse_qs(body.decode())
        out = []
        for path in form.get("paths", []):
            if path in commit.files:
                out.append(_file_entry(path, commit.files[path]))
            elif any(p.startswith(path.rstrip("/") + "/") for p in commit.files):
                out.append({"type": "directory", "oid": git_blob_oid(path.encode()), "path": path})
        self._json(out)

    def resolve(self, body: bytes, repo: str, rev: str, path: str) -> None:
        token = self._token()
        hub_repo = self.hub._repo_for_read(repo, token)
        commit = self.hub._revision(hub_repo, rev)
        self.hub._check_gate(hub_repo, token)
        blob = commit.files.get(path)
        if blob is None:
            raise _HubError(404, "Entry not found", "EntryNotFound", commit=commit.sha)
        size = len(blob.data)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(size)})
        start, end = _byte_range(self.headers.get("Range"), size)
        status = 200
        if self.headers.get("Range"):
            if start >= size and size > 0:
                raise _HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        if self.command == "GET":
            self.hub.stats.served(repo, path, start, end)
        self._send(status, blob.data[start:end], headers, "application/octet-stream")

    def auth_check(self, body: bytes, repo: str) -> None:
        """HfApi.auth_check: 200 when the token may read the repo's files (gate included), else the Hub's error."""
        token = self._token()
        self.hub._check_gate(self.hub._repo_for_read(repo, token), token)
        self._json({})

    def preupload(self, body: bytes, repo: str, rev: str) -> None:
        token = self._token()
        hub_repo = self.hub._repo_for_read(repo, token)
        self._check_commit_rights(hub_repo, token)
        commit = self.hub._revision(hub_repo, rev)
        files = []
        for f in json.loads(body)["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].lower().endswith(_LFS_SUFFIXES) or f["size"] > _REGULAR_MAX_BYTES or b"\0" in sample
            existing = commit.files.get(f["path"])
            oid = (existing.sha256 if existing.lfs else git_blob_oid(existing.data)) if existing else None
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._json({"files": files, "commitOid": commit.sha})

    def commit(self, body: bytes, repo: str, rev: str) -> None:
        token = self._token()
        hub_repo = self.hub._repo_for_read(repo, token)
        self._check_commit_rights(hub_repo, token)
        if rev not in hub_repo.branches:
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "The first line of a commit must be its header")
        with self.hub.lock:
            tree = dict(hub_repo.head(rev).files)
            for item in lines[1:]:
                key, value = item["key"], item["value"]
                if key == "file":
                    data = base64.b64decode(value["content"])
                    tree[value["path"]] = Blob(data, False)
                elif key == "lfsFile":
                    data = self.hub._lfs_store.get(value["oid"])
                    if data is None:
                        raise _HubError(400, f"LFS object {value['oid']} was not uploaded")
                    tree[value["path"]] = Blob(data, True)
                elif key == "deletedFile":
                    if tree.pop(value["path"], None) is None:
                        raise _HubError(404, f"{value['path']} does not exist", "EntryNotFound")
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    for p in [p for p in tree if p.startswith(folder)]:
                        del tree[p]
                else:
                    raise _HubError(400, f"Unknown commit operation {key}")
            summary = lines[0]["value"].get("summary") or "Commit"
            if self._create_pr:
                pull = self.hub._open_pull(hub_repo, tree, summary, lines[0]["value"].get("description") or "",
                                           token.user, base=rev)
                new = hub_repo.commits[hub_repo.branches[pull.ref]]
            else:
                new = self.hub._commit(hub_repo, tree, summary, branch=rev, parent=hub_repo.branches[rev])
        self._json({"success": True, "commitOid": new.sha, "commitUrl": f"{self.hub.url}/{repo}/commit/{new.sha}",
                    "hookOutput": "", "pullRequestUrl": f"{self.hub.url}/{repo}/discussions/{pull.num}"
                    if self._create_pr else None})

    def lfs_batch(self, body: bytes, repo: str) -> None:
        token = self._token()
        hub_repo = self.hub._repo_for_read(repo, token)
        if not self.hub._can_write_namespace(hub_repo.namespace, token):
            raise _HubError(403, f"You don't have the rights to write to {repo}")
        payload = json.loads(body)
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub._lfs_store:
                signature = secrets.token_hex(16)
                with self.hub.lock:
                    self.hub._pending_lfs[signature] = obj["oid"]
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/__lfs/upload/{obj['oid']}?sig={signature}"},
                    "verify": {"href": f"{self.hub.url}/{repo}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(entry)
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   headers={"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_upload(self, body: bytes, oid: str) -> None:
        signature = (self.query.get("sig") or [""])[0]
        with self.hub.lock:
            expected = self.hub._pending_lfs.pop(signature, None)
        if expected != oid:
            raise _HubError(403, "Invalid or expired upload signature")
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HubError(400, "Uploaded content does not match its sha256")
        with self.hub.lock:
            self.hub._lfs_store[oid] = body
        self._send(200)

    def lfs_verify(self, body: bytes, repo: str) -> None:
        self._token()
        payload = json.loads(body)
        data = self.hub._lfs_store.get(payload["oid"])
        if data is None or len(data) != payload["size"]:
            raise _HubError(404, f"LFS object {payload['oid']} not found")
        self._json({"success": True})

    def validate_yaml(self, body: bytes) -> None:
        payload = json.loads(body)
        errors, warnings = validate_card_metadata(payload.get("content", ""))
        status = 400 if errors else 200
        self._json({"errors": [{"message": m} for m in errors], "warnings": [{"message": m} for m in warnings]},
                   status)


def _file_entry(path: str, blob: Blob) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": 134}
    return entry


def _byte_range(header: str | None, size: int) -> tuple[int, int]:
    """[start, end) for a single `bytes=a-b`, `bytes=a-` or `bytes=-n` range (whole file without one)."""
    if not header:
        return 0, size
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or not (m.group(1) or m.group(2)):
        raise _HubError(416, f"Unsupported range {header}")
    first, last = m.groups()
    if not first:
        return max(0, size - int(last)), size
    return int(first), min(size, int(last) + 1) if last else size


_REPO = r"(?P<repo>[^/]+/[^/]+?)"
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    ("POST", re.compile(r"^/api/repos/create$"), "create"),
    ("DELETE", re.compile(r"^/api/repos/delete$"), "delete"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(r"^/api/models/?$"), "search"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$"), "tree"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)$"), "paths_info"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/revision/(?P<rev>[^/]+)$"), "info"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/auth-check$"), "auth_check"),
    ("GET", re.compile(rf"^/api/models/{_REPO}$"), "info"),
    ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/verify$"), "lfs_verify"),
    ("PUT", re.compile(r"^/__lfs/upload/(?P<oid>[0-9a-f]{64})$"), "lfs_upload"),
    ("HEAD", _RESOLVE, "resolve"),
    ("GET", _RESOLVE, "resolve"),
    *hubjobs.ROUTES,
]


def _route(method: str, path: str) -> tuple[str, str, dict[str, str]] | None:
    """(endpoint kind, handler method name, path parameters) for a request, or None."""
    for verb, pattern, handler in _ROUTES + _DATASET_ROUTES:
        m = pattern.match(path)
        if verb == method and m:
            params = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
            if "dataset" in params:  # dataset repos are stored under "datasets/<namespace>/<name>"
                params["repo"] = "datasets/" + params.pop("dataset")
            kind = {"resolve": "resolve_head" if method == "HEAD" else "resolve_get"}.get(handler, handler)
            return kind, handler, params
    return None


def use_hub(server: HubServer, monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Point huggingface_hub at `server` with an isolated HF_HOME, no Xet, no telemetry, no ambient token.

    The client reads some settings at import time, so the module constants are patched as well as the
    environment (merger.hub reads HF_ENDPOINT and the cache location at call time).
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    """A started HubServer that huggingface_hub and merger.hub talk to (import this fixture to use it)."""
    with HubServer() as server:
        use_hub(server, monkeypatch, tmp_path / "hf_home")
        yield server
