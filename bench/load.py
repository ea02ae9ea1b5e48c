"""Concurrent users against the served app (issue 7): N simulated users each run a check and a small merge.

    .venv/bin/python bench/load.py [--users 20] [--waves 1] [--quick] [--timeout 600] [--gguf-every 2]

The app (local mode, generated demo models, a temporary outputs folder) is started in its own process
on 127.0.0.1 and a free port, with the queue settings of `app.main`. Then N users start at once, each
with its own gradio_client.Client in its own thread: a check, then a merge (SLERP / linear / TIES in
turn, every other user also exports a GGUF Q8_0, which llama.cpp loads and verifies in the server).

Each user's models are their own folder names carrying a unique marker (`lt07k3fa9c1`): the check
report, every streamed progress/log/result/card update, the output folder, its files and its
mergekit_config.yml must name that marker and no other user's. While a request waits, the client's
queue status is recorded: a waiting user must have been shown a position. The server's RSS, thread
count and open files are sampled from /proc every 0.1 s; memory is bounded when the peak over the
whole run is close to the peak when the 5th merge had finished, and when further waves of N users
(--waves) against the same server level off instead of adding memory per user. Everything is
bounded: N requests of each kind per wave, one overall deadline (jobs still running then are
cancelled), loopback only.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from merger.app import demo  # noqa: E402

LOOPBACK = "127.0.0.1"
METHODS = ("slerp", "linear", "ties")
MARKER = re.compile(r"lt\d{3}k[0-9a-f]{6}")  # job ids and paths are hex/word: no false hits
POLL_S = 0.1
BOUNDED_AFTER = 5  # memory is compared with the peak once this many merges had finished


# ---------------------------------------------------------------- the server process

def serve(root: Path, port: int, pace: float = 0.0) -> None:
    """The app as `app.main` runs it, but with its outputs and demo models under `root`.

    `pace` > 0 makes every merge last at least that long (a pause when its merge stage starts): the
    demo models merge in a fraction of a second, so on a fast machine a queue would barely form.
    """
    demo.quiet_environment()
    import app
    from merger.app.runs import RunQueue

    def hold(job, event) -> None:  # noqa: ANN001
        if event.stage == "merge" and event.fraction == 0:
            time.sleep(pace)

    settings = demo.Settings(space=False, host=LOOPBACK, port=port, outputs_dir=root / "outputs",
                             demo_dir=root / "demo_models")
    blocks = app.build_app(settings, RunQueue(hook=hold) if pace > 0 else None)
    blocks.queue(default_concurrency_limit=1)
    blocks.launch(server_name=LOOPBACK, server_port=port, ssr_mode=False, quiet=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class Server:
    """`bench/load.py --serve` in a child process; ready once its /config answers."""

    def __init__(self, root: Path, port: int, pace: float = 0.0) -> None:
        self.root, self.port, self.pace = root, port, pace
        self.url = f"http://{LOOPBACK}:{port}"
        self.log_path = root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        env = dict(os.environ, HF_HUB_DISABLE_TELEMETRY="1", GRADIO_ANALYTICS_ENABLED="False",
                   HF_HUB_DISABLE_XET="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        env.pop("SPACE_ID", None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, __file__, "--serve", "--root", str(self.root),
                                          "--port", str(self.port), "--pace", str(self.pace)], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/config", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the app did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.is_file() else ""


@dataclass
class Sample:
    t: float
    rss_kb: int
    threads: int
    fds: int


class ProcSampler(threading.Thread):
    """VmRSS, thread count and open files of one process, from /proc, every `interval` seconds."""

    def __init__(self, pid: int, interval: float = POLL_S) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[Sample] = []
        self._halt = threading.Event()

    def read(self) -> Sample | None:
        try:
            fields = dict(line.split(":", 1) for line in
                          Path(f"/proc/{self.pid}/status").read_text().splitlines() if ":" in line)
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:  # the process has gone
            return None
        return Sample(time.monotonic(), int(fields["VmRSS"].split()[0]), int(fields["Threads"]), fds)

    def run(self) -> None:
        while not self._halt.is_set():
            s = self.read()
            if s is None:
                return
            self.samples.append(s)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def peak_kb(self, until: float | None = None) -> int:
        return max((s.rss_kb for s in self.samples if until is None or s.t <= until), default=0)


# ---------------------------------------------------------------- one simulated user

@dataclass
class Request:
    """One API call as a user saw it."""

    kind: str  # "check" or "merge"
    submitted: float = 0.0
    started: float | None = None  # first status past the queue (processing)
    finished: float | None = None
    ranks: list[int] = field(default_factory=list)  # queue positions shown while IN_QUEUE
    queued_without_rank: int = 0  # IN_QUEUE updates that carried no position
    outputs: list = field(default_factory=list)  # every streamed update, the last is the result
    error: str | None = None

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.submitted

    @property
    def position_went_up(self) -> bool:
        """In a first-come first-served queue the position shown can only go down."""
        return any(b > a for a, b in zip(self.ranks, self.ranks[1:]))

    @property
    def waited(self) -> float | None:
        return None if self.started is None else self.started - self.submitted


@dataclass
class User:
    index: int
    marker: str
    method: str
    quants: list[str]
    text: str
    check: Request = field(default_factory=lambda: Request("check"))
    merge: Request = field(default_factory=lambda: Request("merge"))
    connect_s: float | None = None
    out_dir: Path | None = None
    problems: list[str] = field(default_factory=list)  # cross-talk and wrong results

    @property
    def name(self) -> str:
        return f"load-{self.marker}"


def user_models(demo_models: dict[str, Path], folder: Path, marker: str) -> list[str]:
    """The demo models under folder names carrying the user's marker (hard links: no copies of weights)."""
    out = []
    for name, src in demo_models.items():
        dst = folder / f"{marker}-{name}"
        dst.mkdir(parents=True)
        for f in src.iterdir():
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
        out.append(str(dst))
    return out


def make_users(n: int, demo_models: dict[str, Path], folder: Path, *, gguf_every: int, first: int = 0) -> list[User]:
    users = []
    for i in range(first, first + n):
        marker = f"lt{i:03d}k{secrets.token_hex(3)}"
        method = METHODS[i % len(METHODS)]
        models = demo.models_for_method(user_models(demo_models, folder, marker), method)
        text = f"# load test, user {marker}\n" + demo.starting_recipe(models, method)
        quants = ["Q8_0"] if gguf_every and i % gguf_every == 0 else []
        users.append(User(i, marker, method, quants, text))
    return users


def _call(client, req: Request, args: Sequence, api_name: str, deadline: float) -> None:  # noqa: ANN001
    """Submit, watch the queue status until done, keep every streamed output; cancel at the deadline."""
    req.submitted = time.monotonic()
    job = client.submit(*args, api_name=api_name)
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel()
            req.error = "deadline reached; cancelled"
            return
        status = job.status()
        code = status.code.name
        if code == "IN_QUEUE":
            if status.rank is None:
                req.queued_without_rank += 1
            else:
                req.ranks.append(status.rank)
        elif code in ("PROCESSING", "ITERATING", "PROGRESS") and req.started is None:
            req.started = time.monotonic()
        time.sleep(POLL_S)
    try:
        final = job.result(timeout=max(1.0, deadline - time.monotonic()))
    except Exception as e:  # a user's failure is a result of the load test, not a crash of it
        req.error = f"{type(e).__name__}: {e}"[:300]
        return
    req.finished = time.monotonic()
    if req.started is None:
        req.started = req.finished
    req.outputs = [*job.outputs()] or [final]
    if req.outputs[-1] != final:
        req.outputs.append(final)


def foreign_markers(value: object, own: str) -> set[str]:
    text = value if isinstance(value, str) else repr(value)
    return set(MARKER.findall(text)) - {own}


def audit(user: User) -> None:
    """The user's results name only their own marker, and the files on disk are theirs."""
    p = user.problems
    if user.check.outputs:
        report, status = user.check.outputs[-1]
        if not report.startswith("### Check: ✓ **OK**"):
            p.append(f"check not OK: {report[:120]!r}")
        if user.marker not in report:
            p.append("check report does not name the user's models")
    for req in (user.check, user.merge):
        for out in req.outputs:
            if foreign := foreign_markers(out, user.marker):
                p.append(f"{req.kind} output shows other users' markers {sorted(foreign)}")
    if not user.merge.outputs:
        return
    progress, log, result, card = user.merge.outputs[-1]
    if 'data-status="done"' not in progress:
        p.append(f"merge not done: {result[:160]!r}")
        return
    if log.count("done in") != 1:
        p.append(f"log has {log.count('done in')} 'done in' lines")
    m = re.search(r"Files in `([^`]+)`", result)
    if not m:
        p.append("result names no output folder")
        return
    user.out_dir = Path(m.group(1))
    if user.out_dir.name != user.name:
        p.append(f"output folder {user.out_dir.name} is not {user.name}")
    on_disk = sorted(f.relative_to(user.out_dir).as_posix() for f in user.out_dir.rglob("*") if f.is_file())
    table = result.split("| file | size |", 1)[-1].split("\n\n", 1)[0]  # not the GGUF sanity table
    # a row names its file as `code`, or (local mode) as a download link served from this user's own folder
    rows = re.findall(r"^\| (?:`([^`]+)`|\[([^\]]+)\]\(gradio_api/file=([^)]+)\)) \|", table, re.MULTILINE)
    listed = [code or name for code, name, _ in rows]
    for _, name, link in rows:
        if link and Path(unquote(link)) != user.out_dir / name:
            p.append(f"the download link of {name} is {unquote(link)}, not in {user.out_dir}")
    if sorted(listed) != on_disk:
        p.append(f"result lists {listed}, folder holds {on_disk}")
    config = user.out_dir / "mergekit_config.yml"
    if not config.is_file() or config.read_text() != user.text:
        p.append("mergekit_config.yml is not the user's recipe")
    ggufs = [f for f in on_disk if f.endswith(".gguf")]
    if ggufs != [f"{user.name}-{q}.gguf" for q in user.quants]:
        p.append(f"GGUF files {ggufs} for quants {user.quants}")
    if f"# {user.name}" not in card:
        p.append("card is not the user's")


def simulate(url: str, user: User, deadline: float, go: threading.Barrier) -> None:
    """One user: connect, wait for everyone, check, then merge, leave."""
    from gradio_client import Client

    client = None
    try:
        t = time.monotonic()
        client = Client(url, verbose=False, download_files=False)
        user.connect_s = time.monotonic() - t
    except Exception as e:  # recorded; the others still start together
        user.problems.append(f"connect: {type(e).__name__}: {e}"[:300])
    try:
        go.wait(timeout=max(1.0, deadline - time.monotonic()))
        if client is None:
            return
        _call(client, user.check, (user.text, user.quants), "/check", deadline)
        if user.check.error is None:
            _call(client, user.merge, (user.text, user.name, False, False, user.quants), "/merge", deadline)
    except Exception as e:  # the run records it; one user's failure must not stop the others
        user.problems.append(f"{type(e).__name__}: {e}"[:300])
    finally:
        if client is not None:
            client.close()  # the user leaves: its heartbeat connection ends, as when a tab is closed


# ---------------------------------------------------------------- the run

@dataclass
class Wave:
    """One crowd of simultaneous users; later waves reuse the same server."""

    wall_s: float
    peak_rss_kb: int
    end_rss_kb: int


@dataclass
class LoadReport:
    users: list[User]
    samples: list[Sample]
    waves: list[Wave]
    startup_s: float
    idle_rss_kb: int  # the server before the first user connected
    peak_rss_kb: int
    k: int  # merges finished when peak_rss_at_k_kb was taken
    peak_rss_at_k_kb: int  # peak until the k-th merge had finished
    end_rss_kb: int  # after all users finished
    merge_done_rss_kb: list[int]  # RSS just after each merge finished, in finishing order
    job_folders: list[str]  # what the outputs folder holds at the end
    stray: list[str]  # problems found on disk across users

    def completed(self, kind: str) -> int:
        """Requests of this kind that returned a result (right or wrong: see errors())."""
        return sum(1 for u in self.users if getattr(u, kind).finished is not None)

    def errors(self) -> list[str]:
        out = [f"user {u.index}: {r.kind}: {r.error}" for u in self.users for r in (u.check, u.merge) if r.error]
        out += [f"user {u.index}: {p}" for u in self.users for p in u.problems]
        return out + self.stray


def run_load(users: int, *, waves: int = 1, timeout: float = 600.0, gguf_every: int = 2,
             bounded_after: int = BOUNDED_AFTER, root: Path | None = None, pace: float = 0.0,
             echo: Callable[[str], None] = lambda s: None) -> LoadReport:
    """Start the app, run `waves` crowds of `users` simultaneous users one after the other, stop it; all
    within `timeout` seconds. Memory is compared between the peak until the `bounded_after`-th merge
    finished and the whole run, and between waves (the same load again must not need more memory)."""
    own_root = root is None
    root = Path(tempfile.mkdtemp(prefix="merger-load-")) if root is None else root
    t0 = time.monotonic()
    deadline = t0 + timeout
    server = Server(root, free_port(), pace)
    try:
        server.start(timeout=min(180.0, timeout))
        startup_s = time.monotonic() - t0
        echo(f"app up at {server.url} in {startup_s:.1f} s (pid {server.proc.pid})")
        sampler = ProcSampler(server.proc.pid)
        idle = sampler.read()
        sampler.start()
        demo_models = {name: root / "demo_models" / name for name in demo.DEMO_MODELS}
        crowd: list[User] = []
        done_waves: list[Wave] = []
        for w in range(waves):
            if time.monotonic() > deadline:
                break
            wave = make_users(users, demo_models, root / "users", gguf_every=gguf_every, first=w * users)
            go = threading.Barrier(users)
            threads = [threading.Thread(target=simulate, args=(server.url, u, deadline, go),
                                        name=f"user-{u.index}") for u in wave]
            start = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()) + 15)
            wall_s = time.monotonic() - start
            time.sleep(1.0)  # let the server settle before the wave's last samples
            samples = [s.rss_kb for s in sampler.samples if s.t >= start]
            done_waves.append(Wave(wall_s, max(samples, default=0), samples[-1] if samples else 0))
            echo(f"wave {w + 1}: {wall_s:.1f} s, server peak RSS {done_waves[-1].peak_rss_kb / 1024:.0f} MB")
            crowd += wave
        sampler.stop()
        for u in crowd:
            audit(u)
        stray = _audit_disk(crowd, root / "outputs")
        ends = sorted(u.merge.finished for u in crowd if u.merge.finished is not None)
        k = min(bounded_after, len(ends))
        k_end = ends[k - 1] if ends else None
        done_rss = [_rss_at(sampler.samples, t) for t in ends]
        folders = sorted(p.relative_to(root / "outputs").as_posix()
                         for p in (root / "outputs").glob("*/*")) if (root / "outputs").is_dir() else []
        return LoadReport(crowd, sampler.samples, done_waves, startup_s, idle.rss_kb if idle else 0,
                          sampler.peak_kb(), k, sampler.peak_kb(k_end) if k_end else 0,
                          sampler.samples[-1].rss_kb if sampler.samples else 0, done_rss, folders, stray)
    finally:
        server.stop()
        if own_root:
            shutil.rmtree(root, ignore_errors=True)


def _rss_at(samples: list[Sample], t: float) -> int:
    """The first sample at or after t (the RSS just after that event)."""
    return next((s.rss_kb for s in samples if s.t >= t), samples[-1].rss_kb if samples else 0)


def _audit_disk(users: list[User], outputs: Path) -> list[str]:
    """Each finished merge has its own job folder holding exactly its own output, and nothing else is there."""
    problems = []
    done = [u for u in users if u.out_dir is not None]
    jobs = [u.out_dir.parent for u in done]
    if len(set(jobs)) != len(jobs):
        problems.append("two users' outputs share a job folder")
    present = sorted(outputs.iterdir()) if outputs.is_dir() else []
    if sorted(jobs) != present:
        problems.append(f"outputs holds {len(present)} job folders for {len(jobs)} finished merges")
    for u in done:
        inside = [p.name for p in u.out_dir.parent.iterdir()]
        if inside != [u.name]:
            problems.append(f"job folder of user {u.index} holds {inside}")
    return problems


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): the smallest value with at least q% of values at or below it."""
    s = sorted(values)
    return s[max(1, math.ceil(q / 100 * len(s))) - 1] if s else float("nan")


def format_report(r: LoadReport) -> str:
    """The summary table printed by the bench and pasted into bench/RESULTS.md."""
    n = len(r.users)
    per_wave = n // max(1, len(r.waves))
    lines = [f"{len(r.waves)} wave(s) of {per_wave} simultaneous users, wall "
             f"{' + '.join(f'{w.wall_s:.1f}' for w in r.waves)} s (app start {r.startup_s:.1f} s before that)", "",
             "| request | completed | errors | p50 s | p95 s | max s | waited in queue | max position shown |",
             "|---|---|---|---|---|---|---|---|"]
    for kind in ("check", "merge"):
        reqs = [getattr(u, kind) for u in r.users]
        lat = [q.latency for q in reqs if q.latency is not None]
        queued = [q for q in reqs if q.ranks or q.queued_without_rank]
        shown = sum(1 for q in queued if q.ranks)
        top = max((max(q.ranks) for q in reqs if q.ranks), default=None)
        up = sum(1 for q in reqs if q.position_went_up)
        lines.append(f"| {kind} | {len(lat)}/{n} | {sum(1 for q in reqs if q.error)} | {percentile(lat, 50):.2f} | "
                     f"{percentile(lat, 95):.2f} | {max(lat, default=float('nan')):.2f} | {len(queued)} "
                     f"({shown} shown a position, {up} saw it go up) | {'-' if top is None else top} |")
    waits = [u.merge.waited for u in r.users if u.merge.waited is not None]
    connects = [u.connect_s for u in r.users if u.connect_s is not None]
    mb = 1 / 1024
    threads = [s.threads for s in r.samples]
    fds = [s.fds for s in r.samples]
    lines += ["",
              f"merge wait before its turn: p50 {percentile(waits, 50):.2f} s, max {max(waits, default=0):.2f} s; "
              f"client connect p50 {percentile(connects, 50):.2f} s, max {max(connects, default=0):.2f} s",
              f"cross-talk / wrong results: {sum(len(u.problems) for u in r.users) + len(r.stray)}; "
              f"job folders on disk: {len(r.job_folders)}",
              f"server RSS: idle {r.idle_rss_kb * mb:.0f} MB, peak after {r.k} merges "
              f"{r.peak_rss_at_k_kb * mb:.0f} MB, peak {r.peak_rss_kb * mb:.0f} MB "
              f"(+{(r.peak_rss_kb - r.peak_rss_at_k_kb) * mb:.0f} MB), end {r.end_rss_kb * mb:.0f} MB",
              f"RSS after each merge (MB): {' '.join(f'{k * mb:.0f}' for k in r.merge_done_rss_kb)}",
              "per wave, peak / end RSS (MB): "
              + ", ".join(f"{w.peak_rss_kb * mb:.0f} / {w.end_rss_kb * mb:.0f}" for w in r.waves),
              f"server threads: start {threads[0] if threads else 0}, peak {max(threads, default=0)}, "
              f"end {threads[-1] if threads else 0}; open files: start {fds[0] if fds else 0}, "
              f"peak {max(fds, default=0)}, end {fds[-1] if fds else 0}"]
    if r.errors():
        lines += ["", "problems:", *[f"- {e}" for e in r.errors()[:40]]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=20, help="simultaneous users (default 20)")
    ap.add_argument("--quick", action="store_true", help="5 users")
    ap.add_argument("--waves", type=int, default=1, help="crowds of --users, one after the other (default 1)")
    ap.add_argument("--timeout", type=float, default=600.0, help="overall limit in seconds (default 600)")
    ap.add_argument("--gguf-every", type=int, default=2, help="every k-th user also exports GGUF Q8_0 (0: none)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--pace", type=float, default=0.0, help="make every merge last at least this many seconds")
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.root, args.port, args.pace)
        return 0
    n = 5 if args.quick else args.users
    if not 1 <= n <= 100 or not 1 <= args.waves <= 10:
        ap.error("--users must be between 1 and 100, --waves between 1 and 10")
    report = run_load(n, waves=args.waves, timeout=args.timeout, gguf_every=args.gguf_every, pace=args.pace,
                      echo=print)
    print(format_report(report))
    return 0 if not report.errors() and report.completed("merge") == n * args.waves else 1


if __name__ == "__main__":
    sys.exit(main())
