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
    sub = p.add_subparsers(dest="command", required=True, metavar="{check,run,eval,methods}")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("recipe", help="mergekit-style YAML recipe file ('-' reads standard input)")
        sp.add_argument("--token", default=os.environ.get("HF_TOKEN") or None,
                        help="Hugging Face token for gated/private models and pushes (default: $HF_TOKEN)")
        sp.add_argument("--allow-bin", action="store_true",
                        help="also load pickle .bin weights (with torch's safe weights-only loader)")
        sp.add_argument("--gguf", default="", metavar="TYPES",
                        help="comma-separated GGUF types to produce, e.g. Q4_K_M,Q8_0 (F16, BF16, F32 too)")
        sp.add_argument("--max-memory", metavar="SIZE",
                        help="working memory for the merge, e.g. 2GB or 500MB: tensors are merged in blocks that "
                        "fit, with the same result (default: half the available RAM, or 80%% of the GPU's free "
                        "memory); the check's RAM/VRAM estimates use it")
        sp.add_argument("--strict", action="store_true",
                        help="treat the recipe's warnings (keys mergekit ignores, e.g. a misspelt 'nomalize') "
                             "as errors")

    c = sub.add_parser("check", help="validate a recipe and its models without downloading weights",
                       description="Validate a recipe and its models from config.json, tokenizer configs and "
                       "safetensors headers only. Exit 0 when the merge can run, 1 when it cannot.")
    common(c)
    c.add_argument("--json", action="store_true", help="print the report as JSON")

    e = sub.add_parser("eval", help="benchmark a published merge (and its parents) with lm-evaluation-harness",
                       description="Run lm-evaluation-harness (pip install lm-eval) on a merged model on the Hub "
                       "and commit a merge-vs-parents table to its card and .eval_results/ files, in one commit.")
    e.add_argument("repo", metavar="OWNER/NAME", help="the merged model's Hub repository")
    e.add_argument("--tasks", default="arc_challenge,hellaswag,mmlu,truthfulqa_mc2,winogrande,gsm8k",
                   help="comma-separated lm-eval tasks (default: the Open LLM Leaderboard v1 six)")
    e.add_argument("--parents", action="store_true", help="also evaluate the parents named in its card")
    e.add_argument("--limit", type=int, default=None, help="only the first N examples of each task")
    e.add_argument("--include-path", default=None, help="a folder of extra lm-eval task definitions")
    e.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    e.add_argument("--no-push", action="store_true", help="print the scores without committing them")
    e.add_argument("--token", default=os.environ.get("HF_TOKEN") or None, help="Hugging Face token (default $HF_TOKEN)")

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
    r.add_argument("--allow-local-paths", action="store_true",
                   help="let --push publish the folder paths of local parents that have no Hub origin (by "
                   "default refused; Hub-cache snapshots are always published as org/name@commit)")
    r.add_argument("--no-eval", action="store_true",
                   help="skip the perplexity of the merge and its parents (on by default; see README)")
    r.add_argument("--gguf-drop-failing", action="store_true",
                   help="keep a GGUF file that fails verification out of the output and the push, instead of failing")
    r.add_argument("--eval-tokens", type=int, default=256, metavar="N",
                   help="token budget of GGUF verification and of the evaluation (default 256)")
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

    from .writer import parse_size

    recipe = _read_recipe(args.recipe)
    budget = parse_size(args.max_memory, "--max-memory") if args.max_memory else None
    report = check(recipe, token=args.token, gguf=_gguf_types(args.gguf), allow_bin=args.allow_bin,
                   max_memory=budget, strict=args.strict)
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
                         allow_local_paths=args.allow_local_paths,
                         max_memory=parse_size(args.max_memory, "--max-memory") if args.max_memory else None,
                         allow_local=not os.environ.get("SPACE_ID"), evaluate=not args.no_eval,
                         drop_failing_gguf=args.gguf_drop_failing, eval_tokens=args.eval_tokens)
    if args.eval_tokens < 16:
        raise MergerError("--eval-tokens must be at least 16 (the verification needs a few tokens per section)")
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
    for name, line in (result.sanity or {}).items():
        print(f"verify {name}: {line}")
    if result.quality is not None:
        q = result.quality
        print("perplexity: " + ", ".join(f"{s.name} {q.perplexity(s):.4g}" for s in (q.merged, *q.parents)))
    for url in result.pushed:
        print(f"pushed: {url}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.harness import evaluate_repo

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise MergerError("--tasks is empty; name lm-eval tasks, e.g. arc_challenge,hellaswag")
    if args.limit is not None and args.limit < 1:
        raise MergerError("--limit must be a positive number of examples per task")
    scores, parents = evaluate_repo(args.repo, tasks, parents=args.parents, token=args.token,
                                    include_path=args.include_path, limit=args.limit, device=args.device,
                                    push=not args.no_push, progress=lambda m: print(m, file=sys.stderr))
    for name, s in [(args.repo, scores), *parents.items()]:
        print(f"{name}: " + ", ".join(f"{t} {v:.4f}" for t, v in s.items()))
    if not args.no_push:
        print(f"results committed to {args.repo} (card table and .eval_results/)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "methods":
            return cmd_methods()
        if args.command == "check":
            return cmd_check(args)
        if args.command == "eval":
            return cmd_eval(args)
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
