"""Command line: `python -m merger check RECIPE` and `python -m merger run RECIPE OUT_DIR`."""

from __future__ import annotations

import argparse
import json
import os
import signal
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
  python -m merger run recipe.yml ./merged --stream --push me/my-merge
  python -m merger check recipe.yml --job
  python -m merger run recipe.yml --job --job-image hf.co/spaces/me/llm-merger --push me/my-merge
  python -m merger eval me/my-merge --parents --job --job-image hf.co/spaces/me/llm-merger

exit codes: 0 success; 1 the check found problems; 2 bad input (recipe, models, options);
130 cancelled (Ctrl-C)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m merger", description="Merge open language models from "
                                "mergekit-style YAML recipes: pre-flight check, merge, GGUF, Hub push.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{check,run,eval,methods}")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("recipe", help="mergekit-style YAML recipe file ('-' reads standard input, env:NAME "
                        "the environment variable NAME)")
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
    c.add_argument("--job", action="store_true",
                   help="also choose the Hugging Face Jobs hardware: flavor, estimated time and cost")
    c.add_argument("--flavor", metavar="NAME", help="with --job: this Jobs flavor instead of the cheapest that fits")

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
    ej = e.add_argument_group("Hugging Face Jobs (the evaluation on your account's hardware; the job commits)")
    ej.add_argument("--job", action="store_true", help="run as a Hugging Face Job that commits the results itself")
    ej.add_argument("--flavor", metavar="NAME", help="Jobs hardware (default: the lowest estimated cost among the "
                    "flavors whose RAM, disk and GPU memory hold the largest model)")
    ej.add_argument("--job-image", metavar="IMAGE", help="image with this project: a Space running it "
                    "(hf.co/spaces/OWNER/NAME) or a Docker image (default: $MERGER_JOB_IMAGE, or this Space's own)")
    ej.add_argument("--progress-lines", action="store_true",
                    help="print progress as JSON lines on stdout (how a job reports to the app and the CLI)")

    r = sub.add_parser("run", help="check, fetch, merge, and optionally convert to GGUF and push",
                       description="Run the merge tensor by tensor and write mergekit's output layout to OUT_DIR.")
    common(r)
    r.add_argument("out_dir", nargs="?",
                   help="output folder (must not exist or be empty unless --overwrite); not with --job")
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
    r.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="read the parents' weights from the Hub by range requests while merging instead of "
                        "downloading them: the disk holds only the output (default: on a Space when the "
                        "download would not fit on its disk, else download)")
    r.add_argument("--no-check", action="store_true", help=argparse.SUPPRESS)
    r.add_argument("--remixed-from", metavar="OWNER/NAME", help=argparse.SUPPRESS)  # the app's remix, in a job
    j = r.add_argument_group("Hugging Face Jobs (the merge on your account's hardware; needs --push)")
    j.add_argument("--job", action="store_true",
                   help="run as a Hugging Face Job: parents mounted read-only, the result pushed by the job")
    j.add_argument("--flavor", metavar="NAME", help="Jobs hardware (default: the lowest estimated cost among the "
                   "flavors whose RAM, disk and GPU memory fit the check's estimates)")
    j.add_argument("--job-image", metavar="IMAGE", help="image with this project: a Space running it "
                   "(hf.co/spaces/OWNER/NAME) or a Docker image (default: $MERGER_JOB_IMAGE, or this Space's own)")
    j.add_argument("--progress-lines", action="store_true",
                   help="print progress as JSON lines on stdout (how a job reports to the app and the CLI)")
    j.add_argument("--mounted", action="append", default=[], metavar="REF=SHA:PATH",
                   help="a Hub model of the recipe already on disk at commit SHA (a job's Volume)")

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
    if path.startswith("env:"):
        from .errors import RecipeError

        text = os.environ.get(path[4:])
        if text is None:
            raise RecipeError(f"the environment variable {path[4:]} (named by {path}) is not set")
        return parse_recipe(text, allow_local=allow_local, base_dir=Path.cwd())
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
    plan = None
    if args.job and report.ok:
        from .compute.jobs import plan_job
        from .pipeline import RunOptions

        plan = plan_job(recipe, RunOptions(out_dir=Path("."), token=args.token, gguf=_gguf_types(args.gguf),
                                           allow_bin=args.allow_bin, max_memory=budget, strict=args.strict),
                        flavor=args.flavor, report=report)
    if args.json:
        data = report.as_dict()
        if plan is not None:
            c = plan.choice
            data["job"] = {"flavor": c.flavor.name, "seconds": round(c.seconds), "usd": round(c.usd, 4),
                           "timeout": c.timeout, "rejected": {f.name: list(why) for f, why in c.rejected}}
        print(json.dumps(data, indent=2))
    else:
        print(report.to_text())
        if plan is not None:
            print("\n" + "\n".join(plan.lines()))
    return 0 if report.ok else 1


def _mounted(items: Sequence[str]) -> dict[str, tuple[str, str]]:
    """--mounted REF=SHA:PATH values as RunOptions.mounted."""
    from .errors import ModelError

    out = {}
    for item in items:
        ref, eq, rest = item.partition("=")
        sha, colon, path = rest.partition(":")
        if not (eq and colon and ref and sha and path):
            raise ModelError(f"--mounted {item}: write it as REF=SHA:PATH (e.g. org/name=0123abcd:/parents/0)")
        out[ref] = (sha, path)
    return out


def _follow_job(handle, bar: StderrProgress):  # noqa: ANN001, ANN202 - a compute Handle and its result
    """Run a job's handle with the progress bar; the first Ctrl-C cancels the job on the Hub and waits for it."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None

    def interrupt(signum, frame) -> None:  # noqa: ANN001
        signal.signal(signal.SIGINT, previous)
        print("\ncancelling the Hugging Face Job (Ctrl-C again to stop waiting)...", file=sys.stderr)
        threading.Thread(target=handle.cancel, daemon=True).start()

    if main_thread:
        signal.signal(signal.SIGINT, interrupt)
    try:
        return handle.run(bar)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def cmd_job(args: argparse.Namespace, recipe, options, bar) -> int:
    """`run --job`: plan, create the Hugging Face Job, follow its log with the same progress bar."""
    from .compute.jobs import Jobs

    def show_plan(plan) -> None:
        print("\n".join(plan.lines()), file=sys.stderr)

    handle = Jobs(image=args.job_image, flavor=args.flavor, on_plan=show_plan).submit(recipe, options)
    try:
        outcome = _follow_job(handle, bar)
    finally:
        bar.close()
    for w in outcome.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"the Hugging Face Job {handle.url} merged and pushed in {outcome.seconds:.1f}s")
    for url in outcome.pushed:
        print(f"pushed: {url}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import RunOptions, run
    from .writer import parse_size

    recipe = _read_recipe(args.recipe)
    if args.job and args.out_dir:
        raise MergerError("a Hugging Face Job pushes its result and writes nothing here: drop OUT_DIR")
    if not args.job and not args.out_dir:
        raise MergerError("give the output folder (OUT_DIR), or run it as a Hugging Face Job with --job --push")
    if (args.flavor or args.job_image) and not args.job:
        raise MergerError("--flavor and --job-image are for --job")
    if args.job and args.stream:
        raise MergerError("--stream is for a run here: a Hugging Face Job mounts its parents read-only instead")
    if not args.strict:
        for w in recipe.warnings:
            print(f"warning: {w}", file=sys.stderr)
    options = RunOptions(out_dir=Path(args.out_dir or "."), device=args.device, seed=args.seed,
                         shard_size=parse_size(args.shard_size), allow_bin=args.allow_bin,
                         overwrite=args.overwrite, token=args.token, gguf=_gguf_types(args.gguf),
                         push=args.push, private=args.private, gguf_repo=args.gguf_repo,
                         overwrite_repo=args.overwrite_repo, skip_check=args.no_check, stream=args.stream,
                         strict=args.strict,
                         allow_local_paths=args.allow_local_paths,
                         max_memory=parse_size(args.max_memory, "--max-memory") if args.max_memory else None,
                         allow_local=not os.environ.get("SPACE_ID"), evaluate=not args.no_eval,
                         drop_failing_gguf=args.gguf_drop_failing, eval_tokens=args.eval_tokens,
                         mounted=_mounted(args.mounted), remixed_from=args.remixed_from)
    if args.eval_tokens < 16:
        raise MergerError("--eval-tokens must be at least 16 (the verification needs a few tokens per section)")
    bar = StderrProgress()
    if args.job:
        return cmd_job(args, recipe, options, bar)
    cancel = threading.Event()
    lines = None
    if args.progress_lines:
        from .compute.protocol import LinePrinter

        lines = LinePrinter()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    if main_thread:  # a job is stopped with SIGTERM: clean up as for a cancel (a created repo is deleted)
        signal.signal(signal.SIGTERM, lambda signum, frame: cancel.set())
    try:
        result = run(recipe, options, progress=lines or bar, cancel=cancel)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        bar.close()
    if lines is not None:
        lines.result(result)
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
    from .pipeline import Event

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise MergerError("--tasks is empty; name lm-eval tasks, e.g. arc_challenge,hellaswag")
    if args.limit is not None and args.limit < 1:
        raise MergerError("--limit must be a positive number of examples per task")
    if (args.flavor or args.job_image) and not args.job:
        raise MergerError("--flavor and --job-image are for --job")
    if args.job and args.no_push:
        raise MergerError("a Hugging Face Job keeps nothing itself: drop --no-push, or run the evaluation here")
    bar = StderrProgress()
    if args.job:
        return cmd_eval_job(args, tasks, bar)
    lines = None
    if args.progress_lines:
        from .compute.protocol import LinePrinter

        lines = LinePrinter()
    show = lines or bar
    state = {"committing": False}

    def stop(signum, frame) -> None:  # noqa: ANN001 - a job is stopped with SIGTERM: before the commit, nothing lands
        if not state["committing"]:  # SystemExit: no `except Exception` inside lm-eval can swallow it
            print("cancelled: the evaluation was stopped before its results were committed; the repository is "
                  "unchanged", file=sys.stderr)
            raise SystemExit(130)

    def committing(active: bool) -> None:  # a stop during the commit lets it finish: it lands whole or not at all
        state["committing"] = active

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    if main_thread:
        signal.signal(signal.SIGTERM, stop)
    try:
        scores, parents = evaluate_repo(args.repo, tasks, parents=args.parents, token=args.token,
                                        include_path=args.include_path, limit=args.limit, device=args.device,
                                        push=not args.no_push, committing=committing,
                                        progress=lambda message, fraction: show(Event("evaluate", fraction, message)))
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        bar.close()
    if lines is not None:
        lines.data({"scores": scores, "parents": parents, "committed": not args.no_push})
    return _print_scores(args, scores, parents, committed=not args.no_push)


def _print_scores(args: argparse.Namespace, scores: dict, parents: dict, *, committed: bool) -> int:
    for name, s in [(args.repo, scores), *parents.items()]:
        print(f"{name}: " + ", ".join(f"{t} {v:.4f}" for t, v in s.items()))
    if committed:
        print(f"results committed to {args.repo} (card table and .eval_results/)")
    return 0


def cmd_eval_job(args: argparse.Namespace, tasks: list[str], bar: StderrProgress) -> int:
    """`eval --job`: plan, create the Hugging Face Job, follow its log with the same progress bar."""
    from .compute.evaljob import EvalJobs, EvalRequest

    request = EvalRequest(args.repo, tuple(tasks), parents=args.parents, limit=args.limit,
                          include_path=args.include_path, token=args.token)
    handle = EvalJobs(image=args.job_image, flavor=args.flavor,
                      on_plan=lambda plan: print("\n".join(plan.lines()), file=sys.stderr)).submit(request)
    try:
        result = _follow_job(handle, bar)
    finally:
        bar.close()
    parents = {str(k): dict(v) for k, v in result.get("parents", {}).items()}
    print(f"the Hugging Face Job {handle.url} evaluated {args.repo}")
    return _print_scores(args, dict(result.get("scores", {})), parents, committed=bool(result.get("committed")))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # run's OUT_DIR is optional (not with --job), and argparse does not match an optional positional that
    # comes after options (`run RECIPE --no-eval OUT`): take the one word left over as OUT_DIR
    if args.command == "run" and args.out_dir is None and len(extra) == 1 and not extra[0].startswith("-"):
        args.out_dir, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
