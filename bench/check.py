"""Pre-flight check latency for a recipe of three Hub models, against the local Hub-protocol server.

    .venv/bin/python bench/check.py [--layers 32] [--shards 2] [--repeat 5]

Three models with the tensor count of a 7B Llama (32 layers, 2 shards each) are served by
tests/hubserver.py on 127.0.0.1; `python -m merger check` runs against them as a user would (a fresh
process: Python and torch start-up included) and in-process (the check alone). Bytes served are
counted to show that only configs and safetensors headers are read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    from merger.app.tiny import make_tiny_model
    from tests.hubserver import HubServer

    with tempfile.TemporaryDirectory() as tmp, HubServer() as server:
        root = Path(tmp)
        base = make_tiny_model(root / "base", "llama", seed=1, num_layers=args.layers, shards=args.shards)
        folders = {"acme/base": base}
        for i, name in enumerate(("acme/chat", "acme/code")):
            folders[name] = make_tiny_model(root / name.split("/")[1], perturb_from=base, seed=10 + i,
                                            shards=args.shards)
        for repo, folder in folders.items():
            server.upload_folder(folder, repo)
        weights = sum(f.stat().st_size for folder in folders.values() for f in folder.glob("*.safetensors"))
        recipe = root / "ties.yml"
        recipe.write_text("models:\n  - model: acme/base\n" + "".join(
            f"  - model: {r}\n    parameters: {{density: 0.5, weight: 0.5}}\n" for r in list(folders)[1:])
            + "merge_method: ties\nbase_model: acme/base\ndtype: bfloat16\n")
        env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(root / "hf"), "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1"}
        env.pop("HF_TOKEN", None)

        cli_times = []
        for i in range(args.repeat):  # a fresh HF_HOME each time: nothing is cached from the run before
            before = server.stats.total_bytes()
            started = time.perf_counter()
            result = subprocess.run([sys.executable, "-m", "merger", "check", str(recipe)], cwd=REPO,
                                    env={**env, "HF_HOME": str(root / f"hf-cli-{i}")}, capture_output=True, text=True)
            cli_times.append(time.perf_counter() - started)
            if result.returncode != 0:
                raise SystemExit(result.stdout + result.stderr)
            served = server.stats.total_bytes() - before

        os.environ.update({k: env[k] for k in ("HF_ENDPOINT", "HF_HOME", "HF_HUB_DISABLE_XET")})
        from merger.pipeline import check
        from merger.recipe import load_recipe

        parsed = load_recipe(recipe)
        inproc = []
        for i in range(args.repeat):
            os.environ["HF_HOME"] = str(root / f"hf-in-{i}")
            started = time.perf_counter()
            report = check(parsed)
            inproc.append(time.perf_counter() - started)
            assert report.ok
        tensors = len(report.models[parsed.base_model].tensors)
        print(f"3 Hub models, {tensors} tensors each in {args.shards} shards, {weights / 1e6:.1f} MB of weights "
              f"on the server; {args.repeat} runs")
        print(f"`python -m merger check` (fresh process): median {statistics.median(cli_times):.2f}s, "
              f"max {max(cli_times):.2f}s")
        print(f"check alone (in-process, warm imports, cold cache): median {statistics.median(inproc):.3f}s, "
              f"max {max(inproc):.3f}s")
        print(f"bytes served per check: {served / 1e3:.0f} kB (configs, tokenizer configs and safetensors headers "
              f"only; the {weights / 1e6:.1f} MB of tensor data are never requested)")


if __name__ == "__main__":
    main()
