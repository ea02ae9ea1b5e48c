"""Output files uploaded while the merge is still running; the push stays one atomic commit at the end.

A merge writes its shards one after the other. Each finished shard (and each GGUF file once made)
goes to the Hub's LFS storage at once with `preupload_lfs_files`, in a background thread, so the push
at the end only commits: the repository's history gets one commit with every file, or nothing.
The target repository is created (or checked to be ours) before the first upload and deleted again
if the run fails or is cancelled before its commit.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from huggingface_hub import CommitOperationAdd

from . import publish
from .errors import HubError
from .hub_env import _api
from .hub_errors import _call

EARLY_SUFFIXES = (".safetensors", ".gguf")  # large files, stored in LFS, whose content is final when closed


class ShardUploader:
    """Uploads finished output files to `repo_id` in the background; `operations()` hands them to the commit."""

    def __init__(self, repo_id: str, *, token: str | None, private: bool, overwrite: bool) -> None:
        publish.validate_repo_id(repo_id)
        publish.check_write_access(repo_id, token=token)
        self.repo_id, self.token = repo_id, token
        self.api = _api(token)
        self.existing: Any = publish._existing(self.api, repo_id, token)
        if self.existing is not None and not overwrite and not publish._made_by_tool(self.existing):
            raise HubError(f"{repo_id} already exists and was not made by this tool; choose another name, or "
                           "allow overwriting it explicitly (--overwrite-repo)")
        self.created = False
        if self.existing is None:
            _call(lambda: self.api.create_repo(repo_id, private=private), repo_id=repo_id, token=token,
                  verb="create")
            self.created = True
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="upload")
        self._uploads: dict[str, tuple[Path, Future]] = {}
        self._handles: list[BinaryIO] = []
        self._lock = threading.Lock()
        self.uploaded_bytes = 0

    def add(self, path: Path) -> None:
        """Start uploading a finished file (as `path.name` in the repo); small or other files wait for the push."""
        path = Path(path)
        if not path.name.endswith(EARLY_SUFFIXES):
            return
        with self._lock:
            failed = [f for _, f in self._uploads.values() if f.done() and f.exception() is not None]
        if failed:  # an earlier upload failed for good: stop the run now rather than at the push
            raise failed[0].exception()
        handle = open(path, "rb")  # an open file survives the output folder's rename into place
        with self._lock:
            self._handles.append(handle)
            self._uploads[path.name] = (path, self._pool.submit(self._upload, path.name, handle))

    def _upload(self, name: str, handle: BinaryIO) -> CommitOperationAdd:
        try:
            op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=handle)
            _call(lambda: self.api.preupload_lfs_files(self.repo_id, additions=[op]), repo_id=self.repo_id,
                  token=self.token, verb="upload to")
        finally:
            handle.close()
        with self._lock:
            self.uploaded_bytes += op.upload_info.size
        return op

    def operations(self, files: dict[str, Path]) -> dict[str, CommitOperationAdd]:
        """The uploaded operations for `files` (path in repo -> final local path), after waiting for them.

        A file whose content may have changed since (another size) or that the Hub stores as a regular
        file (its bytes go in the commit itself) is left to the push.
        """
        out = {}
        for name, (staged, future) in list(self._uploads.items()):
            op = future.result()
            final = files.get(name)
            if final is None or not final.exists() or final.stat().st_size != op.upload_info.size:
                continue
            if op._upload_mode != "lfs" or not op._is_uploaded:
                continue
            out[name] = op
        return out

    def abort(self) -> None:
        """Stop uploading; delete the repository if this run created it (nothing was committed)."""
        with self._lock:
            futures = [f for _, f in self._uploads.values()]
        for f in futures:
            f.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for handle in self._handles:  # those of uploads cancelled before they started
            handle.close()
        if self.created:
            publish._delete_quietly(self.api, self.repo_id)
            self.created = False

    def close(self) -> None:
        self._pool.shutdown(wait=True)

