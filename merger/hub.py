"""The Hugging Face Hub side of a merge: pin revisions, read metadata without weights, fetch.

Everything goes through `huggingface_hub`. The endpoint (HF_ENDPOINT) and cache (HF_HUB_CACHE, HF_HOME)
are read at call time (merger.hub_env), so tests and Spaces can point them elsewhere after import. The
token is always passed explicitly (OAuth in the app, --token/HF_TOKEN in the CLI); None means anonymous,
never the machine's stored token, so a Space never acts with its owner's credentials. It is never logged
and never appears in an error message: every failure becomes one HubError line a person can act on
(merger.hub_errors). Publishing is merger.publish.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import hf_hub_download, hf_hub_url, snapshot_download, try_to_load_from_cache
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

from .card import ParentInfo
from .errors import HubError, ModelError
from .hub_env import DEFAULT_ENDPOINT, Progress, _api, hub_cache_dir, hub_endpoint, job_cache  # noqa: F401
from .hub_errors import (MAX_RETRY_AFTER, RETRY_DELAYS, _call, _hub_error, _root_cause, _status,  # noqa: F401
                         suggest_repos)
from .output import TOKENIZER_FILES
from .publish import WRITE_ROLES, PushResult, check_write_access, push_folder, validate_repo_id  # noqa: F401
from .recipe import ModelRef, parse_model_ref
from .sources import (INDEX_FILE, MAX_HEADER_BYTES, SINGLE_FILE, TensorHeader, parse_header_bytes,
                      read_safetensors_header)

# Publishing lives in merger.publish, error handling in merger.hub_errors, endpoint and cache in
# merger.hub_env; their public names stay importable from here. Patch a name where it is defined.
CONFIG_FILES = ("config.json", "generation_config.json")
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
BIN_SINGLE_FILE = "pytorch_model.bin"


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


def repo_files(repo_id: str, *, token: str | None = None) -> list[str]:
    """The file names of a model repository (errors as one-line HubErrors, transient ones retried)."""
    return _call(lambda: _api(token).list_repo_files(repo_id), repo_id=repo_id, token=token)


def download_file(repo_id: str, name: str, *, token: str | None = None) -> Path:
    """One file of a model repository, through the Hugging Face cache."""
    return Path(_call(lambda: hf_hub_download(repo_id, name, token=token or False, cache_dir=hub_cache_dir(),
                                              endpoint=hub_endpoint()),
                      repo_id=repo_id, token=token))


# ---------------------------------------------------------------- helpers

def _as_ref(ref: ModelRef | str) -> ModelRef:
    parsed = parse_model_ref(ref, "model", allow_local=False) if isinstance(ref, str) else ref
    if parsed.local:
        raise HubError(f"{parsed} is a local folder, not a Hub model")
    return parsed


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

