"""Hugging Face Jobs on the local test Hub: the endpoints huggingface_hub 2.4's run_job, inspect_job,
fetch_job_logs (server-sent events), cancel_job and list_jobs_hardware call (see its hf_api.py).

A "job" is a local subprocess of the job's command: `python` is this interpreter with the repository on
PYTHONPATH (the image's installed project), the job's environment plus its secrets are its environment,
and each model Volume is materialised, read-only, from the server's repo at the pinned revision under a
per-job root; the command's references to a mount path are pointed there (the container would see the
volume at that path). Its merged stdout and stderr are the job's log. A cancel sends SIGTERM, then
SIGKILL after a grace period, as a container stop does.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
KINDS = ("jobs_hardware", "jobs_create", "jobs_info", "jobs_logs", "jobs_cancel")
CANCEL_GRACE = 15.0  # seconds between SIGTERM and SIGKILL
JOB_WRITE_ROLES = ("admin", "write")

# Hardware as the Hub lists it (GET /api/jobs/hardware); test data in the Hub's format, prices per minute.
HARDWARE: list[dict[str, Any]] = [
    {"name": "cpu-basic", "prettyName": "CPU Basic", "cpu": "2 vCPU", "ram": "16 GB", "ephemeralStorage": "50 GB",
     "accelerator": None, "unitCostMicroUSD": 167, "unitCostUSD": 0.000167, "unitLabel": "minute"},
    {"name": "cpu-upgrade", "prettyName": "CPU Upgrade", "cpu": "8 vCPU", "ram": "32 GB",
     "ephemeralStorage": "50 GB", "accelerator": None, "unitCostMicroUSD": 500, "unitCostUSD": 0.0005,
     "unitLabel": "minute"},
    {"name": "t4-small", "prettyName": "Nvidia T4 - small", "cpu": "4 vCPU", "ram": "15 GB",
     "ephemeralStorage": "50 GB", "accelerator": {"type": "gpu", "model": "T4", "quantity": "1", "vram": "16 GB",
                                                  "manufacturer": "Nvidia"},
     "unitCostMicroUSD": 6667, "unitCostUSD": 0.006667, "unitLabel": "minute"},
    {"name": "l4x1", "prettyName": "Nvidia 1xL4", "cpu": "8 vCPU", "ram": "30 GB", "ephemeralStorage": "400 GB",
     "accelerator": {"type": "gpu", "model": "L4", "quantity": "1", "vram": "24 GB", "manufacturer": "Nvidia"},
     "unitCostMicroUSD": 13333, "unitCostUSD": 0.013333, "unitLabel": "minute"},
    {"name": "a10g-large", "prettyName": "Nvidia A10G - large", "cpu": "12 vCPU", "ram": "46 GB",
     "ephemeralStorage": "200 GB", "accelerator": {"type": "gpu", "model": "A10G", "quantity": "1", "vram": "24 GB",
                                                   "manufacturer": "Nvidia"},
     "unitCostMicroUSD": 25000, "unitCostUSD": 0.025, "unitLabel": "minute"},
    {"name": "a100-large", "prettyName": "Nvidia A100 - large", "cpu": "12 vCPU", "ram": "142 GB",
     "ephemeralStorage": "1000 GB", "accelerator": {"type": "gpu", "model": "A100", "quantity": "1",
                                                    "vram": "80 GB", "manufacturer": "Nvidia"},
     "unitCostMicroUSD": 41667, "unitCostUSD": 0.041667, "unitLabel": "minute"},
]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class LocalJob:
    """One job: its spec as received, its folder, its process and its log."""

    id: str
    namespace: str
    spec: dict[str, Any]
    root: Path
    created_at: str = field(default_factory=_now)
    stage: str = "RUNNING"
    message: str | None = None
    returncode: int | None = None
    logs: list[tuple[str, str]] = field(default_factory=list)  # (timestamp, line)
    cancel_requested: bool = False
    process: subprocess.Popen | None = None
    cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def finished(self) -> bool:
        return self.stage != "RUNNING"

    def info(self, owner_id: str) -> dict[str, Any]:
        image = {"spaceId": self.spec["spaceId"]} if self.spec.get("spaceId") else {
            "dockerImage": self.spec.get("dockerImage")}
        return {"id": self.id, "createdAt": self.created_at, **image, "command": self.spec.get("command"),
                "arguments": self.spec.get("arguments", []), "environment": self.spec.get("environment", {}),
                "secrets": {k: None for k in self.spec.get("secrets", {})}, "flavor": self.spec.get("flavor"),
                "labels": self.spec.get("labels"), "volumes": self.spec.get("volumes"),
                "status": {"stage": self.stage, "message": self.message},
                "owner": {"id": owner_id, "name": self.namespace, "type": "user"}}

    def log_text(self) -> str:
        return "\n".join(line for _, line in self.logs)


class JobsHost:
    """The jobs of one test Hub. Tests read `jobs`, call `forbid(token)` for a token without the `jobs`
    permission, and may replace `hardware`."""

    def __init__(self, hub: Any, root: Path | None = None) -> None:
        self.hub = hub
        self._root = Path(root) if root is not None else None
        self._own_root = root is None
        self.jobs: dict[str, LocalJob] = {}
        self.hardware = [dict(h) for h in HARDWARE]
        self.forbidden: set[str] = set()
        self.extra_pythonpath: list[str] = []  # e.g. a folder with a sitecustomize.py that slows jobs down
        self.lock = threading.Lock()

    @property
    def root(self) -> Path:
        """Where jobs live (a temporary folder made on first use unless given)."""
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="hubjobs-"))
        return self._root

    @root.setter
    def root(self, value: Path) -> None:
        self._root, self._own_root = Path(value), False

    def forbid(self, token: str) -> None:
        """This token lacks the `jobs` permission: creating a job answers 403, as on the Hub."""
        self.forbidden.add(token)

    def wait(self, job_id: str, timeout: float = 120.0) -> LocalJob:
        job = self.jobs[job_id]
        with job.cond:
            job.cond.wait_for(lambda: job.finished, timeout)
        return job

    def close(self) -> None:
        for job in list(self.jobs.values()):
            if job.process is not None and job.process.poll() is None:
                _signal_group(job.process, signal.SIGKILL)
                job.process.wait()
        if self._own_root and self._root is not None:
            _remove(self._root)

    # ------------------------------------------------------------ starting a job

    def start(self, namespace: str, spec: dict[str, Any], token: Any) -> LocalJob:
        job_id = uuid.uuid4().hex[:24]
        root = self.root / job_id
        job = LocalJob(job_id, namespace, spec, root)
        mounts = {}
        for volume in spec.get("volumes") or []:
            mount = volume["mountPath"]
            mounts[mount] = self._materialise(volume, root / "fs" / mount.lstrip("/"), token)
        (root / "work").mkdir(parents=True)
        (root / "home").mkdir()
        command = [sys.executable if c == "python" else c for c in spec["command"] + spec.get("arguments", [])]
        command = [_remap(arg, mounts) for arg in command]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root / "home"),
               "PYTHONPATH": os.pathsep.join([*self.extra_pythonpath, str(REPO_ROOT)]), "HF_ENDPOINT": self.hub.url, "HF_HOME": str(root / "home" / "hf"),
               "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1",
               "LANG": "C.UTF-8"}
        env.update({k: str(v) for k, v in (spec.get("environment") or {}).items()})
        env.update({k: str(v) for k, v in (spec.get("secrets") or {}).items()})
        job.process = subprocess.Popen(command, cwd=root / "work", env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        with self.lock:
            self.jobs[job_id] = job
        threading.Thread(target=self._collect, args=(job,), name=f"job-{job_id}", daemon=True).start()
        if spec.get("timeoutSeconds"):
            timer = threading.Timer(float(spec["timeoutSeconds"]), self._time_out, args=(job,))
            timer.daemon = True
            timer.start()
        return job

    def _materialise(self, volume: dict[str, Any], target: Path, token: Any) -> Path:
        """The repo's files at the volume's revision, read-only, as the container would see them."""
        if volume.get("type", "model") != "model":
            raise JobsError(400, f"volume type {volume.get('type')!r} is not supported by this test Hub")
        repo = self.hub.repos.get(volume["source"])
        if repo is None or not self.hub._can_read(repo, token):
            raise JobsError(404, f"Repository {volume['source']} not found")
        commit = repo.at(volume.get("revision") or "main")
        if commit is None:
            raise JobsError(404, f"Invalid rev id {volume.get('revision')} for {volume['source']}")
        for path, blob in commit.files.items():
            dest = target / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(blob.data)
        if volume.get("readOnly", True):
            for p in sorted(target.rglob("*"), reverse=True):
                p.chmod(0o444 if p.is_file() else 0o555)
            target.chmod(0o555)
        return target

    def _collect(self, job: LocalJob) -> None:
        assert job.process is not None and job.process.stdout is not None
        for raw in job.process.stdout:
            with job.cond:
                job.logs.append((_now(), raw.decode("utf-8", "replace").rstrip("\n")))
                job.cond.notify_all()
        rc = job.process.wait()
        with job.cond:
            job.returncode = rc
            if job.cancel_requested:
                job.stage, job.message = "CANCELED", "Job canceled by user"
            elif job.message == "Job timed out":
                job.stage = "ERROR"
            elif rc == 0:
                job.stage = "COMPLETED"
            else:
                job.stage, job.message = "ERROR", f"Job failed with exit code: {rc}"
            job.cond.notify_all()

    def _time_out(self, job: LocalJob) -> None:
        if job.process is not None and job.process.poll() is None:
            job.message = "Job timed out"
            _signal_group(job.process, signal.SIGKILL)

    def cancel(self, job: LocalJob) -> None:
        if job.process is None or job.process.poll() is not None:
            return
        job.cancel_requested = True
        _signal_group(job.process, signal.SIGTERM)

        def kill_late() -> None:
            if job.process is not None and job.process.poll() is None:
                _signal_group(job.process, signal.SIGKILL)

        timer = threading.Timer(CANCEL_GRACE, kill_late)
        timer.daemon = True
        timer.start()


class JobsError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class JobsEndpoints:
    """Handler methods (mixed into the test Hub's request handler)."""

    def _jobs_fail(self, e: JobsError) -> None:
        self._json({"error": e.message}, e.status, {"X-Error-Message": e.message})  # type: ignore[attr-defined]

    def _job_for(self, namespace: str, job_id: str) -> LocalJob | None:
        token = self._token()  # type: ignore[attr-defined]
        job = self.hub.jobs.jobs.get(job_id)  # type: ignore[attr-defined]
        if token is None or job is None or job.namespace != namespace or not self._may_use(token, namespace):
            self._jobs_fail(JobsError(404, f"Job {job_id} not found"))
            return None
        return job

    def _may_use(self, token: Any, namespace: str) -> bool:
        if token.user == namespace:
            return True
        return self.hub.users.get(token.user, {}).get(namespace) in JOB_WRITE_ROLES  # type: ignore[attr-defined]

    def jobs_hardware(self, body: bytes) -> None:
        self._json(self.hub.jobs.hardware)  # type: ignore[attr-defined]

    def jobs_create(self, body: bytes, namespace: str) -> None:
        host: JobsHost = self.hub.jobs  # type: ignore[attr-defined]
        token = self._token()  # type: ignore[attr-defined]
        raw = (self.headers.get("Authorization") or "").split(" ", 1)[-1].strip()  # type: ignore[attr-defined]
        if token is None:
            return self._jobs_fail(JobsError(401, "You must be authenticated to run Jobs"))
        if raw in host.forbidden or token.role == "read":
            return self._jobs_fail(JobsError(403, "This token does not have the permission to run Jobs "
                                                  "(missing scope: job.write)"))
        if not self._may_use(token, namespace):
            return self._jobs_fail(JobsError(403, f"You cannot run Jobs in the namespace {namespace}"))
        try:
            spec = json.loads(body or b"{}")
            if not isinstance(spec.get("command"), list) or not spec["command"]:
                raise JobsError(400, "command must be a non-empty list")
            if spec.get("flavor") not in {h["name"] for h in host.hardware}:
                raise JobsError(400, f"Unknown flavor {spec.get('flavor')}")
            if not (spec.get("dockerImage") or spec.get("spaceId")):
                raise JobsError(400, "dockerImage or spaceId is required")
            job = host.start(namespace, spec, token)
        except JobsError as e:
            return self._jobs_fail(e)
        self._json(job.info(_owner_id(namespace)))  # type: ignore[attr-defined]

    def jobs_info(self, body: bytes, namespace: str, job_id: str) -> None:
        job = self._job_for(namespace, job_id)
        if job is not None:
            with job.cond:
                self._json(job.info(_owner_id(namespace)))  # type: ignore[attr-defined]

    def jobs_cancel(self, body: bytes, namespace: str, job_id: str) -> None:
        job = self._job_for(namespace, job_id)
        if job is not None:
            self.hub.jobs.cancel(job)  # type: ignore[attr-defined]
            self._json({})  # type: ignore[attr-defined]

    def jobs_logs(self, body: bytes, namespace: str, job_id: str) -> None:
        """Server-sent events: the log so far, then new lines as they come, until the job has finished."""
        job = self._job_for(namespace, job_id)
        if job is None:
            return
        self.send_response(200)  # type: ignore[attr-defined]
        self.send_header("Content-Type", "text/event-stream")  # type: ignore[attr-defined]
        self.send_header("Cache-Control", "no-cache")  # type: ignore[attr-defined]
        self.send_header("Connection", "close")  # type: ignore[attr-defined]
        self.end_headers()  # type: ignore[attr-defined]
        self.close_connection = True
        out = self.wfile  # type: ignore[attr-defined]
        try:
            out.write(_sse(job.created_at, f"===== Job started at {job.created_at} ====="))
            sent, last_write = 0, time.monotonic()
            while True:
                with job.cond:
                    job.cond.wait_for(lambda: len(job.logs) > sent or job.finished, timeout=1.0)
                    new, done = job.logs[sent:], job.finished and len(job.logs) == sent
                for ts, line in new:
                    out.write(_sse(ts, line))
                sent += len(new)
                if new or time.monotonic() - last_write > 10:
                    if not new:
                        out.write(b": keep-alive\n\n")
                    out.flush()
                    last_write = time.monotonic()
                if done:
                    break
            out.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass


ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"^/api/jobs/hardware$"), "jobs_hardware"),
    ("POST", re.compile(r"^/api/jobs/(?P<namespace>[^/]+)$"), "jobs_create"),
    ("GET", re.compile(r"^/api/jobs/(?P<namespace>[^/]+)/(?P<job_id>[^/]+)/logs$"), "jobs_logs"),
    ("POST", re.compile(r"^/api/jobs/(?P<namespace>[^/]+)/(?P<job_id>[^/]+)/cancel$"), "jobs_cancel"),
    ("GET", re.compile(r"^/api/jobs/(?P<namespace>[^/]+)/(?P<job_id>[^/]+)$"), "jobs_info"),
]


def _sse(timestamp: str, line: str) -> bytes:
    return b"data: " + json.dumps({"timestamp": timestamp, "data": line}).encode() + b"\n\n"


def _owner_id(name: str) -> str:
    import hashlib

    return hashlib.md5(name.encode()).hexdigest()[:24]


def _remap(arg: str, mounts: dict[str, Path]) -> str:
    for mount, local in mounts.items():
        arg = re.sub(rf"(?<![\w/.-]){re.escape(mount)}(?=/|$)", str(local), arg)
    return arg


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def _remove(root: Path) -> None:
    """rmtree that also removes the read-only volume copies."""
    if not root.exists():
        return
    for p in root.rglob("*"):
        if p.is_dir() and not p.is_symlink():
            p.chmod(p.stat().st_mode | stat.S_IWUSR | stat.S_IXUSR | stat.S_IRUSR)
    shutil.rmtree(root, ignore_errors=True)
