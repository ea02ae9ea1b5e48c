"""Merge throughput and peak memory, side by side in one run: ours, mergekit's, and the I/O floor.

    .venv/bin/python bench/merge.py [--layers 20] [--hidden 1536] [--vocab 32000] [--skip-mergekit] [--budget 512MB]
    .venv/bin/python bench/merge.py --wide --layers 1 --repeat 1 [--max-memory 1GB]

A synthetic fp16 Llama shape (default ~0.55B parameters) and two fine-tunes of it are generated; then
linear (2 models) and ties (3 models) run with our CLI (`--no-eval`: the merge alone, as mergekit does it;
the perplexity evaluation is timed in bench/verify.py) and with mergekit's, each in its own process
(peak RSS from the kernel's rusage of that process), beside the I/O floor: reading the bytes of every
input file once and writing as many bytes as the output once, with plain unbuffered file reads into
reused buffers and plain writes (no safetensors, no tensor objects); every process, the floor's
included, imports torch. mergekit runs twice: with its defaults (computing in the recipe's fp16) and at
its best on a CPU (fp32 compute with out_dtype float16, --lazy-unpickle, 100M-parameter output shards so
it never holds the whole output). Our run is repeated on a model with twice the layers to show that
peak memory does not grow with model size. All inputs are in the page cache (they were just written),
for every contender alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FLOOR = """
import sys
import torch  # noqa: F401  (every contender pays for importing torch; so does the floor)
inputs, out = sys.argv[1:-1], sys.argv[-1]
chunk = 16 << 20
buffers = [bytearray(chunk) for _ in inputs]  # reused: no fresh allocation (and page faults) per read
views = [memoryview(b) for b in buffers]
files = [open(p, "rb", buffering=0) for p in inputs]
with open(out, "wb", buffering=0) as sink:
    while True:
        sizes = [f.readinto(v) for f, v in zip(files, views)]
        if not any(sizes):
            break
        sink.write(views[0][: sizes[0]])  # the output is as large as one input (same shapes and dtype)
for f in files:
    f.close()
"""


REPEAT = 2


def timed(cmd: list[str], clean: Path | None = None) -> tuple[float, float]:
    """(best seconds, highest peak RSS in GB) over REPEAT runs of a child process.

    The best of a few runs: the first run after a large file was deleted pays for the page cache's
    re-allocation of the output pages, whoever runs first; every contender gets the same chance.
    `clean` (an output folder) is removed before each run.
    """
    runs = []
    for _ in range(REPEAT):
        if clean is not None:
            shutil.rmtree(clean, ignore_errors=True)
        runs.append(_run_once(cmd))
    return min(t for t, _ in runs), max(r for _, r in runs)


def _run_once(cmd: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024**2


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


def make_models(root: Path, layers: int, hidden: int, vocab: int) -> list[Path]:
    """Generated in a child process: the benchmark's own process stays small, so a child's peak RSS
    (which the kernel reports including what it inherited at fork) is its own."""
    subprocess.run([sys.executable, "-c", MAKE_MODELS, str(root), str(layers), str(hidden), str(vocab)],
                   cwd=REPO, check=True)
    return [root / "base", root / "ft1", root / "ft2"]


def recipes(models: list[Path], root: Path) -> dict[str, Path]:
    base, a, b = models
    texts = {
        "linear": f"models:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n  - model: {b}\n"
                  f"    parameters: {{weight: 0.4}}\nmerge_method: linear\ndtype: float16\n",
        "ties": f"models:\n  - model: {base}\n  - model: {a}\n    parameters: {{density: 0.5, weight: 0.5}}\n"
                f"  - model: {b}\n    parameters: {{density: 0.5, weight: 0.5}}\nmerge_method: ties\n"
                f"base_model: {base}\nparameters: {{normalize: true}}\ndtype: float16\n",
    }
    # mergekit computes in the recipe's dtype (fp16 arithmetic on a CPU is slow); its best run computes in fp32
    texts.update({f"{k}-fp32": v.replace("dtype: float16\n", "dtype: float32\nout_dtype: float16\n")
                  for k, v in texts.items()})
    out = {}
    for name, text in texts.items():
        out[name] = root / f"{name}.yml"
        out[name].write_text(text)
    return out


def ours(recipe: Path, out: Path, max_memory: str | None = None) -> tuple[float, float]:
    budget = ["--max-memory", max_memory] if max_memory else []
    # --no-eval: mergekit does not evaluate; the perplexity of merge and parents is timed in bench/verify.py
    return timed([sys.executable, "-m", "merger", "run", str(recipe), str(out), "--device", "cpu", "--no-eval",
                  *budget], clean=out)


def wide(root: Path, layers: int, max_memory: str, skip_mergekit: bool) -> None:
    """TIES over three models of a Llama-3-wide shape (hidden 4096, vocab 128256): the embedding and
    the head are 525M entries each, so peak memory is set by the memory budget, not the tensors."""
    models = make_models(root / "wide", layers, 4096, 128256)
    rec = recipes(models, root)["ties"]
    o_s, o_rss = ours(rec, root / "ours-wide", max_memory)
    shutil.rmtree(root / "ours-wide", ignore_errors=True)
    print(f"wide shape: {params(models[0]):.2f}B parameters fp16 per model, {layers} layer(s), hidden 4096, "
          f"vocab 128256; CPU threads: {os.cpu_count()}")
    print(f"ties, ours with --max-memory {max_memory}: {o_s:.1f}s, peak RSS {o_rss:.2f}G")
    if not skip_mergekit:
        m_s, m_rss = theirs(rec, root / "mk-wide")
        shutil.rmtree(root / "mk-wide", ignore_errors=True)
        print(f"ties, mergekit: {m_s:.1f}s, peak RSS {m_rss:.2f}G; ours / mergekit: time {o_s / m_s:.2f}x, "
              f"RSS {o_rss / m_rss:.2f}x")


# mergekit at its best on a CPU: fp32 compute (the `-fp32` recipes), lazy unpickling, and small output shards
# (mergekit holds a whole output shard in memory before writing it; the default shard is 5B parameters).
MERGEKIT_BEST = ["--lazy-unpickle", "--out-shard-size", "100M"]


def theirs(recipe: Path, out: Path, best: bool = False) -> tuple[float, float]:
    return timed([str(Path(sys.executable).parent / "mergekit-yaml"), str(recipe), str(out),
                  "--no-copy-tokenizer", "--quiet", *(MERGEKIT_BEST if best else [])], clean=out)


def floor(models: list[Path], out: Path) -> tuple[float, float]:
    return timed([sys.executable, "-c", FLOOR, *[str(m / "model.safetensors") for m in models], str(out)])


def params(folder: Path) -> float:
    """Billions of parameters, from the safetensors header (no torch import in this process)."""
    raw = (folder / "model.safetensors").open("rb")
    header = json.loads(raw.read(int.from_bytes(raw.read(8), "little")))
    raw.close()
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__") / 1e9


def main() -> None:
    global REPEAT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--repeat", type=int, default=REPEAT, help="runs per contender; the best time is kept")
    ap.add_argument("--workdir", default=None, help="where to generate models (default: a temp folder)")
    ap.add_argument("--wide", action="store_true",
                    help="only the wide-vocabulary shape (hidden 4096, vocab 128256, --layers layers; mergekit "
                    "peaks near 20 GB there: run it alone, e.g. under flock)")
    ap.add_argument("--max-memory", default="1GB", help="our memory budget for the wide shape (default 1GB)")
    ap.add_argument("--budget", default="512MB",
                    help="also run our ties with this --max-memory (default 512MB; 'none' to skip)")
    args = ap.parse_args()
    REPEAT = args.repeat
    root = Path(args.workdir or tempfile.mkdtemp(prefix="merge-bench-"))
    try:
        if args.wide:
            wide(root, args.layers, args.max_memory, args.skip_mergekit)
            return
        models = make_models(root / "m1", args.layers, args.hidden, args.vocab)
        size = params(models[0])
        rec = recipes(models, root)
        rows = []
        for method, inputs in (("linear", models[1:]), ("ties", models)):
            f_s, f_rss = floor(inputs, root / "floor.safetensors")
            o_s, o_rss = ours(rec[method], root / f"ours-{method}")
            row = {"method": method, "floor_s": f_s, "ours_s": o_s, "ours_rss": o_rss, "floor_rss": f_rss}
            if not args.skip_mergekit:
                row["mk_s"], row["mk_rss"] = theirs(rec[method], root / f"mk-{method}")
                row["mkb_s"], row["mkb_rss"] = theirs(rec[f"{method}-fp32"], root / f"mk-{method}", best=True)
            rows.append(row)
            shutil.rmtree(root / f"ours-{method}", ignore_errors=True)
            shutil.rmtree(root / f"mk-{method}", ignore_errors=True)
        budgeted = None
        if args.budget != "none":
            budgeted = ours(rec["ties"], root / "ours-budget", args.budget)
            shutil.rmtree(root / "ours-budget", ignore_errors=True)
        shutil.rmtree(root / "m1")
        big = make_models(root / "m2", args.layers * 2, args.hidden, args.vocab)
        big_s, big_rss = ours(recipes(big, root)["ties"], root / "ours-big")
        print(f"model: {size:.2f}B parameters fp16, {args.layers} layers, hidden {args.hidden}; "
              f"CPU threads: {os.cpu_count()}")
        print("mergekit: defaults (mk) and at its best (mkb: fp32 compute, " + " ".join(MERGEKIT_BEST) + ")")
        print(f"{'method':8} {'I/O floor':>10} {'ours':>8} {'mk':>8} {'mkb':>8} {'ours/floor':>11} {'ours/mk':>8} "
              f"{'ours/mkb':>9} {'RSS ours':>9} {'RSS mk':>7} {'RSS mkb':>8} {'RSS/mk':>7} {'RSS/mkb':>8}")
        for r in rows:
            mk, mkb = r.get("mk_s"), r.get("mkb_s")
            cells = [f"{r['method']:8}", f"{r['floor_s']:9.1f}s", f"{r['ours_s']:7.1f}s",
                     f"{mk:7.1f}s" if mk else f"{'-':>8}", f"{mkb:7.1f}s" if mkb else f"{'-':>8}",
                     f"{r['ours_s'] / r['floor_s']:10.2f}x", f"{r['ours_s'] / mk:7.2f}x" if mk else f"{'-':>8}",
                     f"{r['ours_s'] / mkb:8.2f}x" if mkb else f"{'-':>9}", f"{r['ours_rss']:8.2f}G",
                     f"{r['mk_rss']:6.2f}G" if mk else f"{'-':>7}", f"{r['mkb_rss']:7.2f}G" if mkb else f"{'-':>8}",
                     f"{r['ours_rss'] / r['mk_rss']:6.2f}x" if mk else f"{'-':>7}",
                     f"{r['ours_rss'] / r['mkb_rss']:7.2f}x" if mkb else f"{'-':>8}"]
            print(" ".join(cells))
        if budgeted is not None:
            b_s, b_rss = budgeted
            mkb = rows[1].get("mkb_s")
            vs = (f"; ours / mkb: time {b_s / mkb:.2f}x, RSS {b_rss / rows[1]['mkb_rss']:.2f}x" if mkb else "")
            print(f"ties, ours with --max-memory {args.budget}: {b_s:.1f}s, peak RSS {b_rss:.2f}G{vs}")
        print(f"ties on {params(big[0]):.2f}B parameters (2x layers): ours {big_s:.1f}s, peak RSS {big_rss:.2f}G "
              f"({big_rss / rows[1]['ours_rss']:.2f}x the RSS at 1x)")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
