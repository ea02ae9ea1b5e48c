"""Streamed parents vs download-then-merge, side by side in one run, on the local Hub-protocol server.

    .venv/bin/python bench/stream.py [--layers 16] [--hidden 1536] [--vocab 32000] [--bandwidth 125]
                                     [--method linear] [--device cpu]

The defaults (3 x 0.88 GB of parents, 21 s of download at 125 MB/s) take about 3 minutes in all on a
loaded 2-core machine. Smaller models measure mostly the fixed cost of a run (start-up, the check, the
small files, the card: about 2 s here), which a download alone does not pay: at 3 x 0.36 GB
(--layers 12 --hidden 1024) the streamed run took 1.42x the download alone on this machine.

Three synthetic fp16 Llama-shaped models (a base and two fine-tunes) are uploaded to tests/hubserver.py,
which runs in its own process and paces file downloads to `--bandwidth` MB/s shared by all connections
(a network link; 0 = unpaced loopback). Each contender is a fresh process with a fresh HF_HOME:

    download alone       merger.hub.download of the three parents (what a run fetches), nothing else
    download-then-merge  python -m merger run RECIPE OUT --no-stream --no-eval
    streamed             python -m merger run RECIPE OUT --stream --no-eval

(--no-eval in both: the evaluation's forward passes are not part of reading the parents, and a streamed
run does not score its parents.)

Peak disk is sampled every 50 ms over the contender's HF_HOME and output folder (partial folders
included). Targets: streamed wall time <= 1.1x the download alone; streamed peak disk <= 1.05x the
output's size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SERVER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.hubserver import HubServer
bandwidth = float(sys.argv[2]) * 1e6 or None
server = HubServer(bandwidth=bandwidth).start()
for spec in sys.argv[3:]:
    repo, folder = spec.split("=", 1)
    server.upload_folder(Path(folder), repo)
print(server.url, flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
server.stop()
"""

MAKE_MODELS = """
import sys, torch
from pathlib import Path
from merger.app.tiny import make_tiny_model
root, layers, hidden, vocab = Path(sys.argv[1]), *map(int, sys.argv[2:5])
base = make_tiny_model(root / "base", "llama", seed=1, num_layers=layers, hidden=hidden, vocab=vocab,
                       dtype=torch.float16)
for i in (1, 2):
    make_tiny_model(root / f"ft{i}", perturb_from=base, seed=10 + i)
"""

DOWNLOAD = """
import sys
from merger import hub
for repo in sys.argv[1:]:
    hub.download(hub.resolve(repo))
"""

RECIPES = {
    "linear": "models:\n  - model: acme/base\n    parameters: {weight: 0.4}\n  - model: acme/ft1\n"
              "    parameters: {weight: 0.3}\n  - model: acme/ft2\n    parameters: {weight: 0.3}\n"
              "merge_method: linear\ndtype: float16\n",
    "ties": "models:\n  - model: acme/base\n  - model: acme/ft1\n    parameters: {density: 0.5, weight: 0.5}\n"
            "  - model: acme/ft2\n    parameters: {density: 0.5, weight: 0.5}\nmerge_method: ties\n"
            "base_model: acme/base\nparameters: {normalize: true}\ndtype: float16\n",
}


def tree_bytes(paths: list[Path]) -> int:
    total = 0
    for root in paths:
        for dirpath, _, files in os.walk(root):
            for f in files:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_size
                except FileNotFoundError:
                    pass
    return total


def measured(cmd: list[str], env: dict[str, str], watch: list[Path]) -> tuple[float, int]:
    """(wall seconds, peak bytes on disk under `watch`) of one child process."""
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_bytes(watch))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], tree_bytes(watch))
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")
    return seconds, peak[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--bandwidth", type=float, default=125.0, help="MB/s of the emulated link (0: unpaced)")
    ap.add_argument("--method", choices=sorted(RECIPES), default="linear")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="stream-bench-"))
    server = None
    try:
        subprocess.run([sys.executable, "-c", MAKE_MODELS, str(root / "models"), str(args.layers),
                        str(args.hidden), str(args.vocab)], cwd=REPO, check=True)
        folders = {"acme/base": root / "models" / "base", "acme/ft1": root / "models" / "ft1",
                   "acme/ft2": root / "models" / "ft2"}
        parents = sum(f.stat().st_size for folder in folders.values() for f in folder.glob("*.safetensors"))
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(REPO), str(args.bandwidth),
                                   *[f"{r}={f}" for r, f in folders.items()]],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        url = server.stdout.readline().strip()
        recipe = root / "recipe.yml"
        recipe.write_text(RECIPES[args.method])

        def env(name: str) -> dict[str, str]:
            e = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(root / name / "hf"), "HF_HUB_DISABLE_XET": "1",
                 "HF_HUB_DISABLE_TELEMETRY": "1"}
            e.pop("HF_TOKEN", None)
            e.pop("SPACE_ID", None)
            return e

        def contender(name: str, cmd: list[str]) -> dict:
            shutil.rmtree(root / name, ignore_errors=True)
            (root / name / "work").mkdir(parents=True)
            seconds, peak = measured(cmd, env(name), [root / name])
            out = root / name / "work" / "out"
            size = tree_bytes([out]) if out.exists() else 0
            shutil.rmtree(root / name, ignore_errors=True)
            return {"seconds": seconds, "peak": peak, "output": size}

        run = [sys.executable, "-m", "merger", "run", str(recipe), "--no-eval"]
        results = {
            "download alone": contender("download", [sys.executable, "-c", DOWNLOAD, *folders]),
            "download-then-merge": contender("downloaded", [*run, str(root / "downloaded" / "work" / "out"),
                                                            "--no-stream", "--device", args.device]),
            "streamed": contender("streamed", [*run, str(root / "streamed" / "work" / "out"), "--stream",
                                               "--device", args.device]),
        }
        base = results["download alone"]["seconds"]
        output = results["streamed"]["output"]
        print(f"3 parents, {parents / 1e9:.2f} GB of fp16 safetensors ({args.layers} layers, hidden {args.hidden}, "
              f"vocab {args.vocab}); {args.method}; link {args.bandwidth:g} MB/s"
              f"{' (unpaced)' if not args.bandwidth else ''}; device {args.device}; CPU threads {os.cpu_count()}")
        print(f"{'contender':20} {'wall':>8} {'/ download':>11} {'peak disk':>10} {'/ output':>9}")
        for name, r in results.items():
            print(f"{name:20} {r['seconds']:7.1f}s {r['seconds'] / base:10.2f}x {r['peak'] / 1e9:9.2f}G "
                  f"{r['peak'] / output:8.2f}x")
        print(f"output {output / 1e9:.2f} GB")
        print(json.dumps({"parents_bytes": parents, "output_bytes": output, **results}))
    finally:
        if server is not None:
            server.stdin.close()
            server.wait(timeout=30)
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
