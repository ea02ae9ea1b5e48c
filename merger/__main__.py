"""Command line: `python -m merger check RECIPE` and `python -m merger run RECIPE OUT_DIR`."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from .errors import CancelledError, MergerError

EPILOG = """examples:
  python -m merger check recipe.yml
  python -m merger run recipe.yml ./merged --device auto --seed 0
  python -m merger run recipe.yml ./merged --gguf Q4_K_M,Q8_0 --push me/my-merge

exit codes: 0 success; 1 the check found problems; 2 bad input (recipe, models, options);
130 cancelled (Ctrl-C)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m merger", description="Merge open language models from "
                                "mergekit-style YAML recipes: pre-flight check, merge, GGUF, Hub push.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{check,run,methods}")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("recipe", help="mergekit-style YAML recipe file ('-' reads standard input)")
        sp.add_argument("--token", default=os.environ.get("HF_TOKEN") or None,
                        help="Hugging Face token for gated/private models and pushes (default: $HF_TOKEN)")
        sp.add_argument("--allow-bin", action="store_true",
                        help="also load pickle .bin weights (with torch's safe weights-only loader)")
        sp.add_argument("--gguf", default="", metavar="TYPES",
                        help="comma-separated GGUF types to produce, e.g. Q4_K_M,Q8_0 (F16, BF16, F32 too)")
        sp.add_argument("--strict", action="store_true",
                        help="treat the recipe's warnings (keys mergekit ignores, e.g. a misspelt 'nomalize') "
                             "as errors")

    c = sub.add_parser("check", help="validate a recipe and its models without downloading weights",
                       description="Validate a recipe and its models from config.json, tokenizer configs and "
                       "safetensors headers only. Exit 0 when the merge can run, 1 when it cannot.")
    common(c)
    c.add_argument("--json", action="store_true", help="print the report as JSON")

    r = sub.add_parser("run", help="check, fetch, merge, and optionally convert to GGUF and push",
                       description="Run the merge tensor by tensor and write mergekit's output layout to OUT_DIR.")
    common(r)
    r.add_argument("out_dir", help="output folder (must not exist or be empty unless --overwrite)")
    r.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda (default: auto)")
    r.add_argument("--seed", type=int, default=0, help="seed for random methods (DARE, DELLA); default 0")
    r.add_argument("--shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    r.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it already exists")
    r.add_argument("--push", metavar="OWNER/NAME", help="push the result to this Hub repository")
    r.add_argument("--private", action="store_true", help="create the pushed repository as private")
    r.add_argument("--gguf-repo", action="store_true", help="push GGUF files to a separate OWNER/NAME-GGUF repo")
    r.add_argument("--overwrite-repo", action="store_true",
                   help="allow pushing to an existing repository that this tool did not create")
    r.add_argument("--no-check", action="store_true", help=argparse.SUPPRESS)

    sub.add_parser("methods", help="list the merge methods and their parameters")
    return p


class StderrProgress:
    """A one-line progress bar on a terminal; one line per stage change otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.stage = ""
        self.last = 0.0
        self.started = time.monotonic()

    def __call__(self, event) -> None:  # merger.pipeline.Event
        now = time.monotonic()
        if event.stage != self.stage:
            if self.tty and self.stage:
                sys.stderr.write("\n")
            self.stage, self.started = event.stage, now
        elif now - self.last < (0.1 if self.tty else 5.0) and event.fraction < 1:
            return
        self.last = now
        width = 30
        filled = int(width * min(max(event.fraction, 0.0), 1.0))
        eta = ""
        if 0 < event.fraction < 1:
            eta = f" ETA {int((now - self.started) * (1 - event.fraction) / event.fraction)}s"
        line = f"{event.stage:>8} [{'#' * filled}{'.' * (width - filled)}] {event.fraction * 100:5.1f}%{eta} {event.message}"
        if self.tty:
            sys.stderr.write("\r" + line[:120].ljust(120))
        else:
            sys.stderr.write(line[:200] + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty and self.stage:
            sys.stderr.write("\n")


def _read_recipe(path: str):
    from .recipe import load_recipe, parse_recipe

    allow_local = not os.environ.get("SPACE_ID")
    if path == "-":
        return parse_recipe(sys.stdin.read(), allow_local=allow_local, base_dir=Path.cwd())
    return load_recipe(path, allow_local=allow_local)


def _gguf_types(text: str) -> tuple[str, ...]:
    return tuple(t.strip().upper() for t in text.split(",") if t.strip())


def cmd_methods() -> int:
    from .methods import METHODS

    for m in METHODS.values():
        params = ", ".join(f"{p.name}={'required' if p.required else p.default}" for p in m.params) or "-"
        print(f"{m.name:18} base {m.base:9} {params}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .pipeline import check

    recipe = _read_recipe(args.recipe)
    report = check(recipe, token=args.token, gguf=_gguf_types(args.gguf), allow_bin=args.allow_bin,
                   strict=args.strict)
    print(report.to_json() if args.json else report.to_text())
    return 0 if report.ok else 1


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import RunOptions, run
    from .writer import parse_size

    recipe = _read_recipe(args.recipe)
    if not args.strict:
        for w in recipe.warnings:
            print(f"warning: {w}", file=sys.stderr)
    options = RunOptions(out_dir=Path(args.out_dir), device=args.device, seed=args.seed,
                         shard_size=parse_size(args.shard_size), allow_bin=args.allow_bin,
                         overwrite=args.overwrite, token=args.token, gguf=_gguf_types(args.gguf),
                         push=args.push, private=args.private, gguf_repo=args.gguf_repo,
                         overwrite_repo=args.overwrite_repo, skip_check=args.no_check, strict=args.strict,
                         allow_local=not os.environ.get("SPACE_ID"))
    bar = StderrProgress()
    cancel = threading.Event()
    try:
        result = run(recipe, options, progress=bar, cancel=cancel)
    finally:
        bar.close()
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"merged {len(result.plan.outputs)} tensors into {result.out_dir} in {result.seconds:.1f}s")
    for f in result.files:
        print(f"  {f}")
    for g in result.gguf_files:
        print(f"  {g.name}")
    for url in result.pushed:
        print(f"pushed: {url}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "methods":
            return cmd_methods()
        if args.command == "check":
            return cmd_check(args)
        return cmd_run(args)
    except CancelledError as e:
        print(f"cancelled: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("cancelled: interrupted; the partial output was removed", file=sys.stderr)
        return 130
    except MergerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # an unexpected failure: one line, no traceback (MERGER_DEBUG=1 shows it)
        if os.environ.get("MERGER_DEBUG"):
            raise
        print(f"internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]} "
              "(please report it; MERGER_DEBUG=1 shows details)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
