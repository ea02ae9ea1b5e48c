"""Publishing a merged model on the Hub: repo name and token checks, then one commit per repository.

An existing repo is only updated when this tool made it (or overwriting was asked for), and a repo created
here is deleted again when its commit fails. merger.upload starts the same work while the merge runs.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from . import hub_errors
from .card import MOE_RECIPE_FILE, RECIPE_FILE, TOOL_TAG, GGUFFileInfo, build_gguf_card
from .errors import HubError, MergerError
from .hub_env import Progress, _api, hub_endpoint
from .hub_errors import _call, _hub_error

_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
WRITE_ROLES = ("admin", "write", "contributor")


@dataclass(frozen=True)
class PushResult:
    repo_url: str
    commit_sha: str
    gguf_repo_url: str | None = None
    gguf_commit_sha: str | None = None


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
    for wait in (0.0, *hub_errors.RETRY_DELAYS):  # read at call time: tests shorten the waits
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

