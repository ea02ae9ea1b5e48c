"""The Hugging Face Hub side of a merge: pin revisions, read metadata without weights, fetch, publish.

Everything goes through `huggingface_hub`. The endpoint (HF_ENDPOINT) and cache (HF_HUB_CACHE, HF_HOME)
are read at call time, so tests and Spaces can point them elsewhere after import. The token is always
passed explicitly (OAuth in the app, --token/HF_TOKEN in the CLI); None means anonymous, never the
machine's stored token, so a Space never acts with its owner's credentials. It is never logged and
never appears in an error message: every failure becomes one HubError line a person can act on.
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import re
import shutil
import struct
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import httpx2
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
    try_to_load_from_cache,
)
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
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

from .card import MOE_RECIPE_FILE, RECIPE_FILE, TOOL_TAG, GGUFFileInfo, ParentInfo, build_gguf_card
from .errors import HubError, MergerError, ModelError
from .output import TOKENIZER_FILES
from .recipe import ModelRef, parse_model_ref
from .sources import (INDEX_FILE, MAX_HEADER_BYTES, SINGLE_FILE, TensorHeader, parse_header_bytes,
                      read_safetensors_header)

DEFAULT_ENDPOINT = "https://huggingface.co"
RETRY_DELAYS: tuple[float, ...] = (1.0, 2.0, 4.0)  # waits before the 2nd, 3rd, 4th attempt of a transient failure
MAX_RETRY_AFTER = 60.0  # a rate limit asking for a longer wait is reported instead of waited out
CONFIG_FILES = ("config.json", "generation_config.json")
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
BIN_SINGLE_FILE = "pytorch_model.bin"
_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
WRITE_ROLES = ("admin", "write", "contributor")

Progress = Callable[[int, int | None], None]  # (bytes done, bytes total or None when not known yet)
T = TypeVar("T")


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


@dataclass(frozen=True)
class RemoteModel:
    """A Hub model pinned to one commit: what resolve() learned without downloading anything."""

    repo_id: str
    requested: str | None  # the revision the recipe asked for (None = default branch)
    sha: str
    files: Mapping[str, int]  # path -> size in bytes at that commit
    private: bool
    gated: bool
    license: str | None
    license_name: str | None = None
    license_link: str | None = None

    @property
    def access(self) -> str:
        """How the model is reachable, for the check report (called once its files were readable)."""
        return "gated (granted)" if self.gated else "private" if self.private else "public"

    def parent_info(self) -> ParentInfo:
        return ParentInfo(self.repo_id, self.sha, self.license, self.license_name, self.license_link)


@dataclass(frozen=True)
class RemoteMetadata:
    """Configs and safetensors headers of a pinned model, read without any tensor bytes."""

    model: RemoteModel
    config: dict[str, Any]
    generation_config: dict[str, Any] | None
    tokenizer_config: dict[str, Any] | None
    headers: dict[str, TensorHeader]
    weight_files: tuple[str, ...]


@dataclass(frozen=True)
class PushResult:
    repo_url: str
    commit_sha: str
    gguf_repo_url: str | None = None
    gguf_commit_sha: str | None = None


# ---------------------------------------------------------------- resolve, read, download

def resolve(ref: ModelRef | str, *, token: str | None = None) -> RemoteModel:
    """Pin `org/name[@revision]` to a commit sha and list its files (one API call, no downloads)."""
    ref = _as_ref(ref)
    api = _api(token)
    info = _call(lambda: api.model_info(ref.repo, revision=ref.revision, files_metadata=True),
                 repo_id=ref.repo, token=token, revision=ref.revision)
    if info.gated:  # the Hub lists a gated repo to anyone: ask whether *this* token may read its files
        _call(lambda: api.auth_check(ref.repo), repo_id=ref.repo, token=token, revision=ref.revision)
    card = info.card_data
    return RemoteModel(
        repo_id=ref.repo, requested=ref.revision, sha=str(info.sha),
        files={s.rfilename: int(s.size or 0) for s in info.siblings or ()},
        private=bool(info.private), gated=bool(info.gated),
        license=_first(card.license) if card else None,
        license_name=card.get("license_name") if card else None,
        license_link=card.get("license_link") if card else None)


def read_metadata(model: RemoteModel, *, token: str | None = None) -> RemoteMetadata:
    """config.json, tokenizer configs and every safetensors header, fetching header bytes only."""
    if "config.json" not in model.files:
        raise ModelError(f"{model.repo_id}@{model.sha[:10]} has no config.json, so it is not a transformers "
                         "model; check the repo ID")
    config = _json_file(model, "config.json", token)
    generation = _json_file(model, "generation_config.json", token) if "generation_config.json" in model.files else None
    tokenizer = _json_file(model, "tokenizer_config.json", token) if "tokenizer_config.json" in model.files else None
    weights = _weight_files(model, token, allow_bin=False)
    headers: dict[str, TensorHeader] = {}
    for name in weights:
        for tensor, header in _remote_header(model, name, token).items():
            if tensor in headers:
                raise ModelError(f"{model.repo_id}: tensor {tensor} appears in two shards; the repo is corrupt")
            headers[tensor] = header
    return RemoteMetadata(model, config, generation, tokenizer, headers, tuple(weights))


def fetch_model_metadata(ref: ModelRef | str, token: str | None = None
                         ) -> tuple[dict[str, Any], dict[str, TensorHeader], str, str | None]:
    """(config, headers, access, licence) of a Hub model for the pre-flight check; no weights downloaded."""
    meta = read_metadata(resolve(ref, token=token), token=token)
    return meta.config, meta.headers, meta.model.access, meta.model.license


def needed_files(model: RemoteModel, *, token: str | None = None, allow_bin: bool = False) -> list[str]:
    """The files a merge uses: configs, tokenizer, weights (safetensors; pickle .bin only when allowed)."""
    wanted = [f for f in (*CONFIG_FILES, *TOKENIZER_FILES) if f in model.files]
    weights = _weight_files(model, token, allow_bin=allow_bin)
    index = INDEX_FILE if weights[0].endswith(".safetensors") else BIN_INDEX_FILE
    return list(dict.fromkeys(wanted + [index] * (index in model.files) + weights))


def download(model: RemoteModel, *, token: str | None = None, allow_bin: bool = False,
             progress: Progress | None = None, weights: bool = True) -> Path:
    """Fetch only the needed files of the pinned commit into the shared cache; returns the snapshot folder.

    A second call finds everything in the cache and makes no request at all. weights=False fetches the
    configs and tokenizer only (parents streamed by merger.remote).
    """
    names = needed_files(model, token=token, allow_bin=allow_bin)
    if not weights:
        names = [n for n in names if n in (*CONFIG_FILES, *TOKENIZER_FILES, INDEX_FILE)]
    cache = hub_cache_dir()
    cached = sum(model.files.get(n, 0) for n in names if _cached(model, n, cache))
    missing = sum(model.files.get(n, 0) for n in names) - cached
    _check_disk(missing, cache, model.repo_id)
    folder = _call(lambda: snapshot_download(
        model.repo_id, revision=model.sha, cache_dir=cache, endpoint=hub_endpoint(), token=token or False,
        allow_patterns=names, tqdm_class=_byte_progress(progress, cached)), repo_id=model.repo_id, token=token)
    if progress:
        progress(cached + missing, cached + missing)
    return Path(folder)


def cached_bytes(ref: ModelRef | str, *, token: str | None = None) -> int:
    """Bytes of the model's weight files already in the cache in effect (they need no download)."""
    model = resolve(ref, token=token)
    cache = hub_cache_dir()
    return sum(model.files.get(n, 0) for n in _weight_files(model, token, allow_bin=True) if _cached(model, n, cache))


def fetch_model(ref: ModelRef | str, *, token: str | None = None, allow_bin: bool = False,
                progress: Progress | None = None) -> tuple[RemoteModel, Path]:
    """resolve() then download(): the pinned model and its local snapshot folder."""
    model = resolve(ref, token=token)
    return model, download(model, token=token, allow_bin=allow_bin, progress=progress)


def _adapter_model(ref: ModelRef, token: str | None) -> RemoteModel:
    from .lora import ADAPTER_FILES

    model = resolve(ref, token=token)
    missing = [f for f in ADAPTER_FILES if f not in model.files]
    if missing:
        raise ModelError(f"{ref} has no {missing[0]}; a LoRA adapter repo holds {' and '.join(ADAPTER_FILES)}, "
                         "as PEFT saves it")
    return model


def adapter_metadata(ref: ModelRef, token: str | None = None) -> tuple[dict[str, Any], dict[str, TensorHeader]]:
    """A Hub LoRA adapter's adapter_config.json and weights header, without its tensor bytes."""
    from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    model = _adapter_model(ref, token)
    return _json_file(model, ADAPTER_CONFIG, token), _remote_header(model, ADAPTER_WEIGHTS, token)


def fetch_adapter(ref: ModelRef, *, token: str | None = None) -> Path:
    """A Hub LoRA adapter pinned to a commit and downloaded (cached): its local folder."""
    from .lora import ADAPTER_FILES

    model = _adapter_model(ref, token)
    _check_disk(sum(model.files.get(n, 0) for n in ADAPTER_FILES), hub_cache_dir(), model.repo_id)
    return Path(_call(lambda: snapshot_download(
        model.repo_id, revision=model.sha, cache_dir=hub_cache_dir(), endpoint=hub_endpoint(), token=token or False,
        allow_patterns=list(ADAPTER_FILES)), repo_id=model.repo_id, token=token))


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


# ---------------------------------------------------------------- publishing

def repo_files(repo_id: str, *, token: str | None = None) -> list[str]:
    """The file names of a model repository (errors as one-line HubErrors, transient ones retried)."""
    return _call(lambda: _api(token).list_repo_files(repo_id), repo_id=repo_id, token=token)


def download_file(repo_id: str, name: str, *, token: str | None = None) -> Path:
    """One file of a model repository, through the Hugging Face cache."""
    return Path(_call(lambda: hf_hub_download(repo_id, name, token=token or False, cache_dir=hub_cache_dir(),
                                              endpoint=hub_endpoint()),
                      repo_id=repo_id, token=token))


def validate_repo_id(repo_id: str) -> None:
    """Refuse names the Hub would refuse, before anything is created."""
    namespace, sep, name = repo_id.partition("/")
    ok = (sep and _REPO_NAME.fullmatch(namespace) and _REPO_NAME.fullmatch(name) and "--" not in repo_id
          and ".." not in repo_id and not name.endswith((".", "-", ".git")))
    if not ok:
        raise HubError(f"'{repo_id}' is not a valid repository name: use 'namespace/name' with letters, digits, "
                       "'-', '_' or '.' (at most 96 characters each, no '--' or '..')")


def check_write_access(repo_id: str, *, token: str | None) -> str:
    """The account name of the token, after checking it may create and write repos in the namespace."""
    if not token:
        raise HubError("publishing needs a Hugging Face token with write access; sign in "
                       "(or pass --token / set HF_TOKEN)")
    api = _api(token)
    who = _call(lambda: api.whoami(token), repo_id=None, token=token)
    user = who.get("name", "")
    namespace = repo_id.split("/")[0]
    access = who.get("auth", {}).get("accessToken") or {}
    settings = f"{hub_endpoint()}/settings/tokens"
    if access.get("role") == "read":
        raise HubError(f"your token is read-only, so it cannot publish {repo_id}; create a token with write "
                       f"access at {settings} and use it")
    if access.get("role") == "fineGrained" and not _fine_grained_can_write(access, namespace):
        raise HubError(f"your fine-grained token has no 'write' permission on '{namespace}'; edit it at "
                       f"{settings} or use another token")
    if namespace == user:
        return user
    org = next((o for o in who.get("orgs", []) if o.get("name") == namespace), None)
    if org is None:
        raise HubError(f"you are signed in as '{user}', who cannot publish under '{namespace}' (neither your "
                       f"account nor one of your organisations this sign-in may use); publish as "
                       f"'{user}/{repo_id.split('/')[1]}', or, if you belong to '{namespace}', sign out and sign in "
                       f"again ticking '{namespace}' on the consent screen (with a token: give it access to "
                       f"'{namespace}')")
    if org.get("roleInOrg") not in WRITE_ROLES:
        raise HubError(f"your role in '{namespace}' is '{org.get('roleInOrg')}', which cannot create "
                       f"repositories; ask an admin of '{namespace}' for write access or publish under '{user}/'")
    return user


def push_folder(folder: str | Path, repo_id: str, *, token: str | None, private: bool, overwrite: bool = False,
                gguf_files: Sequence[str | Path] = (), gguf_repo: str | None = None,
                progress: Progress | None = None,
                commit_message: str = "Upload merged model", uploader: Any = None) -> PushResult:
    """Publish a merged model folder as one commit; GGUF files go to their own repo (default NAME-GGUF).

    The token's write access to the namespaces is checked before anything is created. An existing repo is
    only updated when this tool made it (mergekit_config.yml or mergekit_moe_config.yml + the tool's tag in its card) or when
    `overwrite` is set. A repo created by this call is deleted again if its commit fails, so a failed
    push never leaves a half-filled repository. `uploader` (merger.upload.ShardUploader for `repo_id`)
    holds the repo it prepared and files it already uploaded while the merge ran: they are committed
    without uploading them again.
    """
    folder = Path(folder)
    validate_repo_id(repo_id)
    uploads = _folder_files(folder)
    if not uploads:
        raise HubError(f"{folder} has no files to publish; run the merge first")
    ggufs = [Path(p) for p in gguf_files]
    target_gguf = (gguf_repo or f"{repo_id}-GGUF") if ggufs else None
    if target_gguf:
        validate_repo_id(target_gguf)
    for repo in dict.fromkeys(r for r in (repo_id, target_gguf) if r):
        check_write_access(repo, token=token)
    api = _api(token)
    if target_gguf == repo_id:
        uploads += [(p.name, p) for p in ggufs if all(p.resolve() != local.resolve() for _, local in uploads)]
        ggufs = []
    else:  # GGUF files inside the folder go to their own repo only
        uploads = [(name, local) for name, local in uploads if all(local.resolve() != p.resolve() for p in ggufs)]
    main_sha = _publish(api, repo_id, uploads, token=token, private=private, overwrite=overwrite,
                        message=commit_message, progress=progress, uploader=uploader)
    result = PushResult(f"{hub_endpoint()}/{repo_id}", main_sha)
    if not ggufs:
        return result
    infos = [GGUFFileInfo.from_path(p) for p in ggufs]
    card = build_gguf_card(ModelCard((folder / "README.md").read_text(encoding="utf-8")),
                           model_repo=repo_id, gguf_repo=target_gguf, gguf_files=infos)
    staged = [(p.name, p) for p in ggufs] + [(n, folder / n) for n in (RECIPE_FILE, MOE_RECIPE_FILE)
                                             if (folder / n).is_file()]
    gguf_sha = _publish(api, target_gguf, staged, token=token, private=private, overwrite=overwrite,
                        message=f"Upload GGUF files of {repo_id}", progress=progress,
                        extra={"README.md": str(card).encode("utf-8")})
    return PushResult(result.repo_url, main_sha, f"{hub_endpoint()}/{target_gguf}", gguf_sha)


def _publish(api: HfApi, repo_id: str, uploads: list[tuple[str, Path]], *, token: str | None, private: bool,
             overwrite: bool, message: str, progress: Progress | None,
             extra: Mapping[str, bytes] | None = None, uploader: Any = None) -> str:
    """Create (or update our own) repo and upload everything in one commit; returns the commit sha."""
    # an uploader (merger.upload.ShardUploader) prepared the repo before the merge
    existing = _existing(api, repo_id, token) if uploader is None else uploader.existing
    if existing is not None and not overwrite and not _made_by_tool(existing):
        raise HubError(f"{repo_id} already exists and was not made by this tool; choose another name, or allow "
                       "overwriting it explicitly (--overwrite-repo)")
    created = uploader is not None and uploader.created
    if existing is None and uploader is None:
        _call(lambda: api.create_repo(repo_id, private=private), repo_id=repo_id, token=token, verb="create")
        created = True
    try:
        early = uploader.operations(dict(uploads)) if uploader is not None else {}
        ops = [early.get(path) or CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local))
               for path, local in uploads]
        ops += [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in (extra or {}).items()]
        keep = {op.path_in_repo for op in ops} | {".gitattributes"}
        stale = [CommitOperationDelete(path_in_repo=s.rfilename) for s in existing.siblings or ()
                 if s.rfilename not in keep] if existing is not None else []
        total = sum(op.upload_info.size for op in ops)
        done = 0
        if progress:
            progress(0, total)
        for op in ops:
            _call(lambda: api.preupload_lfs_files(repo_id, additions=[op]), repo_id=repo_id, token=token,
                  verb="upload to")
            done += op.upload_info.size
            if progress:
                progress(done, total)
        info = api.create_commit(repo_id, [*ops, *stale], commit_message=message)
        if uploader is not None:
            uploader.created = False  # committed: no longer a half-made repo to delete on a later failure
    except Exception as e:
        if created:
            _delete_quietly(api, repo_id)
            if uploader is not None:
                uploader.created = False  # deleted here: nothing left for the uploader's abort to delete
        if isinstance(e, MergerError):  # ours already (a cancel from the progress callback included)
            raise
        raise _hub_error(e, repo_id, token=token, verb="upload to",
                         after=" (the new repository was deleted again)" if created else "") from None
    return str(info.oid)


# ---------------------------------------------------------------- helpers

def _as_ref(ref: ModelRef | str) -> ModelRef:
    parsed = parse_model_ref(ref, "model", allow_local=False) if isinstance(ref, str) else ref
    if parsed.local:
        raise HubError(f"{parsed} is a local folder, not a Hub model")
    return parsed


def _api(token: str | None) -> HfApi:
    return HfApi(endpoint=hub_endpoint(), token=token or False)


def _first(value: Any) -> str | None:
    if isinstance(value, list):
        return str(value[0]) if value else None
    return str(value) if value else None


def read_text(model: RemoteModel, name: str, *, token: str | None = None) -> str:
    """One small text file of a pinned model (cached), with the usual retries and error messages."""
    path = _call(lambda: hf_hub_download(model.repo_id, name, revision=model.sha, cache_dir=hub_cache_dir(),
                                         endpoint=hub_endpoint(), token=token or False),
                 repo_id=model.repo_id, token=token)
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ModelError(f"{model.repo_id}: {name} is not UTF-8 text; the repo is broken at {model.sha[:10]}") from None


def _json_file(model: RemoteModel, name: str, token: str | None) -> dict[str, Any]:
    try:
        data = json.loads(read_text(model, name, token=token))
    except json.JSONDecodeError:
        raise ModelError(f"{model.repo_id}: {name} is not valid JSON; the repo is broken at {model.sha[:10]}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{model.repo_id}: {name} is not a JSON object")
    return data


def _weight_files(model: RemoteModel, token: str | None, *, allow_bin: bool) -> list[str]:
    """Shards named by the index, else the single file; .bin only if allowed and no safetensors exist."""
    for index, single, is_bin in ((INDEX_FILE, SINGLE_FILE, False), (BIN_INDEX_FILE, BIN_SINGLE_FILE, True)):
        if is_bin and not allow_bin:
            if any(f.endswith(".bin") for f in model.files):
                raise ModelError(f"{model.repo_id} has only pickle .bin weights; use a safetensors version of it, "
                                 "or allow .bin files explicitly (--allow-bin)")
            break
        if index in model.files:
            weight_map = _json_file(model, index, token).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelError(f"{model.repo_id}: {index} has no weight_map; the repo is broken")
            shards = sorted(set(weight_map.values()))
            absent = [s for s in shards if s not in model.files]
            if absent:
                raise ModelError(f"{model.repo_id}: {index} names {absent[0]}, which is not in the repo")
            return shards
        if single in model.files:
            return [single]
    raise ModelError(f"{model.repo_id}@{model.sha[:10]} has no model weights (no {SINGLE_FILE} or {INDEX_FILE})")


def _cached(model: RemoteModel, name: str, cache: Path) -> str | None:
    found = try_to_load_from_cache(model.repo_id, name, cache_dir=cache, revision=model.sha)
    return found if isinstance(found, str) and os.path.exists(found) else None


def _remote_header(model: RemoteModel, name: str, token: str | None) -> dict[str, TensorHeader]:
    """A shard's header: from the cache when present, else two Range requests (length, then JSON)."""
    local = _cached(model, name, hub_cache_dir())
    if local:
        return read_safetensors_header(local)
    size = model.files.get(name)
    prefix = _call(lambda: _read_range(model, name, 0, 8, token), repo_id=model.repo_id, token=token)
    if len(prefix) < 8:
        raise ModelError(f"{model.repo_id}: {name} is too short to be a safetensors file")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES or (size and 8 + length > size):
        raise ModelError(f"{model.repo_id}: {name} has an impossible safetensors header length ({length})")
    raw = _call(lambda: _read_range(model, name, 8, length, token), repo_id=model.repo_id, token=token)
    return parse_header_bytes(raw, name, 8 + length, size or None)


def _read_range(model: RemoteModel, name: str, start: int, length: int, token: str | None) -> bytes:
    """Exactly `length` bytes at `start`; the stream is closed there even if the server ignores Range."""
    url = hf_hub_url(model.repo_id, name, revision=model.sha, endpoint=hub_endpoint())
    headers = build_hf_headers(token=token or False)
    headers["Range"] = f"bytes={start}-{start + length - 1}"
    headers["Accept-Encoding"] = "identity"
    chunks, got = [], 0
    with get_session().stream("GET", url, headers=headers) as response:
        hf_raise_for_status(response)
        skip = start if response.status_code == 200 else 0
        for chunk in response.iter_bytes():
            if skip:
                dropped = min(skip, len(chunk))
                chunk, skip = chunk[dropped:], skip - dropped
            chunks.append(chunk)
            got += len(chunk)
            if got >= length:
                break
    return b"".join(chunks)[:length]


def _check_disk(needed: int, cache: Path, repo_id: str) -> None:
    probe = cache
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise HubError(f"downloading {repo_id} needs {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free "
                       f"in {cache}; free some space or point HF_HOME to a larger disk")


def _byte_progress(progress: Progress | None, already: int) -> type[hf_tqdm]:
    """A silent tqdm class for snapshot_download reporting its byte counter (plus bytes already cached)."""

    class _Bytes(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._reports = progress is not None and kwargs.get("name") == "huggingface_hub.snapshot_download"
            self._done = 0
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self._reports and n:
                self._done += int(n)
                progress(already + self._done, already + int(self.total) if self.total else None)
            return super().update(n)

    return _Bytes


def _folder_files(folder: Path) -> list[tuple[str, Path]]:
    """Files to publish, as (path in repo, local path); hidden files and folders are left out."""
    if not folder.is_dir():
        raise HubError(f"{folder} is not a folder; give the merge's output folder")
    return [(p.relative_to(folder).as_posix(), p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def _existing(api: HfApi, repo_id: str, token: str | None) -> Any:
    try:
        return _call(lambda: api.model_info(repo_id), repo_id=repo_id, token=token, reraise=RepositoryNotFoundError)
    except RepositoryNotFoundError:
        return None


def _made_by_tool(info: Any) -> bool:
    files = {s.rfilename for s in info.siblings or ()}
    tags = set(info.tags or ()) | set((info.card_data.tags if info.card_data else None) or ())
    return bool({RECIPE_FILE, MOE_RECIPE_FILE} & files) and TOOL_TAG in tags


def _delete_quietly(api: HfApi, repo_id: str) -> None:
    for wait in (0.0, *RETRY_DELAYS):
        time.sleep(wait)
        try:
            api.delete_repo(repo_id, missing_ok=True)
            return
        except (HfHubHTTPError, httpx2.HTTPError, OSError):
            continue


def _fine_grained_can_write(access: Mapping[str, Any], namespace: str) -> bool:
    grants = access.get("fineGrained") or {}
    for scoped in grants.get("scoped") or ():
        if scoped.get("entity", {}).get("name") == namespace and "repo.write" in scoped.get("permissions", ()):
            return True
    return False


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
