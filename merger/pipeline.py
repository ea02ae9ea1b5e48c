"""check -> fetch -> merge -> gguf -> card -> push, reported as events for the app and the CLI.

Everything a job writes lives in a temporary folder until the end; on any error or a cancel it is
removed, so a failure never leaves a half-written output folder or a half-pushed repository.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from . import architecture as arch
from .card import RECIPE_FILE
from .engine import MergePlan, MergeRunner, Progress, plan_merge
from .errors import CancelledError, MergerError, ModelError
from .output import commit_output, copy_tokenizer, ensure_output_free, prepare_output, write_json
from .recipe import ModelRef, Recipe
from .sources import open_reader
from .writer import DEFAULT_SHARD_SIZE, PlannedTensor, ShardedWriter



@dataclass(frozen=True)
class Event:
    """One progress report of a job: stage, fraction of that stage done, and a human line."""

    stage: str
    fraction: float
    message: str
    bytes_done: int = 0
    bytes_total: int = 0


EventCallback = Callable[[Event], None]


@dataclass
class RunOptions:
    out_dir: Path
    device: str = "auto"
    seed: int = 0
    shard_size: int = DEFAULT_SHARD_SIZE
    allow_bin: bool = False
    overwrite: bool = False
    token: str | None = None
    gguf: tuple[str, ...] = ()
    push: str | None = None
    private: bool = False
    gguf_repo: bool = False
    overwrite_repo: bool = False
    allow_local: bool = True
    skip_check: bool = False
    strict: bool = False  # the recipe's warnings (keys mergekit ignores) stop the run


@dataclass
class RunResult:
    out_dir: Path
    files: list[str]
    plan: MergePlan
    warnings: list[str] = field(default_factory=list)
    gguf_files: list[Path] = field(default_factory=list)
    pushed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    sanity: dict | None = None


def _cancelled(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise CancelledError("the job was cancelled; nothing was written")


def inspect_models(recipe: Recipe, folders: Mapping[ModelRef, Path], *, allow_bin: bool) -> dict[ModelRef, arch.ModelInfo]:
    """ModelInfo for every referenced model, from its local folder's config and headers."""
    return {ref: arch.inspect_local(folders[ref], ref=ref, allow_bin=allow_bin) for ref in recipe.referenced_models()}


def load_vocab(folder: Path) -> dict[str, int] | None:
    """Token -> id from tokenizer.json (model vocab plus added tokens), or None when absent."""

    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data.get("model", {}).get("vocab", {})
    if isinstance(vocab, list):  # unigram: [[piece, score], ...]
        vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
    vocab = dict(vocab)
    for tok in data.get("added_tokens", []):
        vocab[tok["content"]] = tok["id"]
    return vocab


def merge_local(recipe: Recipe, folders: Mapping[ModelRef, Path], out_dir: Path, *, device: str = "auto",
                seed: int = 0, shard_size: int = DEFAULT_SHARD_SIZE, allow_bin: bool = False,
                overwrite: bool = False, progress: EventCallback | None = None,
                cancel: threading.Event | None = None,
                extra_sinks: Callable[[Path, MergePlan, dict], list[Any]] | None = None,
                before_commit: Callable[[Path, MergePlan], list[str]] | None = None) -> RunResult:
    """Merge models already on disk into out_dir (mergekit's layout), atomically.

    `extra_sinks(tmp, plan, config)` may add outputs fed with every merged tensor as it is produced
    (objects with write(name, tensor), close() and abort(), e.g. a GGUF stream); the tokenizer files
    are in `tmp` before the merge starts, config.json is written only after it (a folder killed
    mid-merge has no config, so nothing can load it).
    """
    started = time.monotonic()
    infos = inspect_models(recipe, folders, allow_bin=allow_bin)
    vocabs = union = None
    if recipe.tokenizer_source is not None:
        vocabs = {ref: v for ref in infos if (v := load_vocab(folders[ref])) is not None}
    if recipe.tokenizer_source == "union":
        union = _union(recipe, infos, folders)
    plan = plan_merge(recipe, infos, vocabs=vocabs, union_vocab=union.vocab if union else None)
    tmp = prepare_output(out_dir, overwrite=overwrite)
    readers = {}
    sinks: list[Any] = []
    try:
        config = arch.output_config(infos[plan.reference].config, num_layers=plan.num_layers,
                                    vocab_size=plan.vocab_size, dtype=plan.out_dtype,
                                    tie_word_embeddings=plan.tie_word_embeddings, layer_sources=plan.layer_sources)
        files = _write_tokenizer_and_recipe(recipe, plan, folders, tmp, union)
        readers = {ref: open_reader(folders[ref], allow_bin=allow_bin) for ref in infos}
        writer = ShardedWriter(tmp, [PlannedTensor(o.name, o.dtype, o.shape) for o in plan.outputs],
                               shard_size=shard_size, metadata={"mergekit_method": recipe.method})
        sinks = extra_sinks(tmp, plan, config) if extra_sinks is not None else []

        def on_progress(p: Progress) -> None:
            if progress:
                progress(Event("merge", p.done / max(p.total, 1), p.message, p.bytes_done, p.bytes_total))

        MergeRunner(plan, readers, device=device, seed=seed, progress=on_progress, cancel=cancel).run(
            [writer.write, *(sink.write for sink in sinks)])
        files += writer.finish()
        write_json(tmp / "config.json", config)
        files.append("config.json")
        for sink in sinks:
            sink.close()  # what became of its files is before_commit's business (it may delete them)
        sinks = []
        _cancelled(cancel)
        if before_commit is not None:
            files += before_commit(tmp, plan)
        _cancelled(cancel)
        commit_output(tmp, out_dir)
    except BaseException as e:
        for sink in sinks:
            sink.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ModelError(os_error_message(e, out_dir)) from None
        raise
    finally:
        for r in readers.values():
            r.close()
    return RunResult(out_dir.resolve(), sorted(set(files)), plan, list(plan.warnings),
                     seconds=time.monotonic() - started)


def _union(recipe: Recipe, infos: Mapping[ModelRef, arch.ModelInfo], folders: Mapping[ModelRef, Path]):
    """The union tokenizer of every merged model, the base's (or the first model's) first."""
    from .tokenizer import build_union

    refs = recipe.referenced_models()  # base first, then in order of appearance
    rows = {ref: infos[ref].vocab_size or infos[ref].embedding_rows or 0 for ref in refs}
    return build_union(folders[refs[0]], rows[refs[0]], [(folders[r], rows[r]) for r in refs[1:]])


def _write_tokenizer_and_recipe(recipe: Recipe, plan: MergePlan, folders: Mapping[ModelRef, Path],
                                tmp: Path, union: Any = None) -> list[str]:
    """Generation config and tokenizer of the reference (or tokenizer_source) model, and the recipe."""
    from .output import TOKENIZER_FILES
    from .tokenizer import write_union_tokenizer

    files = []
    ref_folder = folders[plan.reference]
    if (ref_folder / "generation_config.json").is_file():
        shutil.copyfile(ref_folder / "generation_config.json", tmp / "generation_config.json")
        files.append("generation_config.json")
    tok_src = recipe.tokenizer_source if isinstance(recipe.tokenizer_source, ModelRef) else plan.reference
    if union is not None:
        tok_src = recipe.referenced_models()[0]
        write_union_tokenizer(folders[tok_src], union, tmp, TOKENIZER_FILES)
    files += copy_tokenizer(folders[tok_src], tmp, recipe.chat_template, keep=union is not None)
    (tmp / RECIPE_FILE).write_text(recipe.text if recipe.text.endswith("\n") else recipe.text + "\n",
                                   encoding="utf-8")
    files.append(RECIPE_FILE)
    return files


def os_error_message(e: OSError, where: Path) -> str:
    """A file-system failure as one actionable line (disk full is the common one on Spaces)."""
    import errno

    if e.errno == errno.ENOSPC:
        return f"the disk is full while writing {where}; free some space (the partial output was removed)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write {where}; choose a folder you can write to"
    return f"writing {where} failed: {e.strerror or e}"


def resolve_local(recipe: Recipe) -> dict[ModelRef, Path]:
    """Folders of a recipe whose models are all local; Hub models need hub.fetch first."""
    folders = {}
    for ref in recipe.referenced_models():
        if not ref.local:
            raise MergerError(f"{ref} is a Hub model; fetching is needed first")
        folders[ref] = Path(ref.repo)
    return folders


# ---------------------------------------------------------------- the whole job

FLOAT_GGUF_TYPES = {"F16": "f16", "BF16": "bf16", "F32": "f32"}
VERIFY_MAX_PARAMS = 2_000_000_000  # the reference forward runs in fp32 on the CPU: skip it for big models


def check(recipe: Recipe, *, token: str | None = None, gguf: tuple[str, ...] = (), allow_bin: bool = False,
          strict: bool = False):
    """The pre-flight report (merger.check.CheckReport): configs and headers only, no weights."""
    from .check import check_recipe

    return check_recipe(recipe, token=token, gguf_types=list(gguf) or None, allow_bin=allow_bin, strict=strict)


def _check_or_raise(recipe: Recipe, options: RunOptions, progress: EventCallback) -> None:
    progress(Event("check", 0.0, "checking the recipe and the models (no weights are downloaded)"))
    report = check(recipe, token=options.token, gguf=options.gguf, allow_bin=options.allow_bin,
                   strict=options.strict)
    errors = [p for p in report.problems if p.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more problem(s); `python -m merger check` lists them)" if len(errors) > 1 else ""
        fix = f"; {errors[0].fix}" if errors[0].fix else ""
        raise ModelError(f"pre-flight check failed: {errors[0].message}{fix}{more}")
    progress(Event("check", 1.0, "check passed"))


def _fetch(recipe: Recipe, options: RunOptions, progress: EventCallback,
           cancel: threading.Event | None) -> tuple[dict[ModelRef, Path], dict[ModelRef, object]]:
    """Local folders of every model: Hub models are pinned to a commit and downloaded (cached)."""
    folders: dict[ModelRef, Path] = {}
    parents: dict[ModelRef, object] = {}
    refs = recipe.referenced_models()
    for i, ref in enumerate(refs):
        _cancelled(cancel)
        if ref.local:
            folders[ref] = Path(ref.repo)
            continue
        from . import hub

        def on_bytes(done: int, total: int | None, i: int = i, ref: ModelRef = ref) -> None:
            _cancelled(cancel)
            part = done / total if total else 0.0
            progress(Event("download", (i + part) / len(refs), f"{ref}", done, total or 0))

        remote, folder = hub.fetch_model(ref, token=options.token, allow_bin=options.allow_bin, progress=on_bytes)
        folders[ref], parents[ref] = folder, remote
    progress(Event("download", 1.0, "all models are available locally"))
    return folders, parents


def _split_gguf_types(types: tuple[str, ...]) -> tuple[str | None, list[str]]:
    floats = [FLOAT_GGUF_TYPES[t] for t in types if t in FLOAT_GGUF_TYPES]
    quants = [t for t in types if t not in FLOAT_GGUF_TYPES]
    if len(floats) > 1:
        raise ModelError("ask for at most one unquantized GGUF type (F16, BF16 or F32) per run")
    return (floats[0] if floats else None), quants


def run(recipe: Recipe, options: RunOptions, *, progress: EventCallback | None = None,
        cancel: threading.Event | None = None) -> RunResult:
    """The whole job: check, fetch, merge, GGUF (+ verification), card, push. Nothing half-done on failure."""
    from .card import GGUFFileInfo, ParentInfo, build_card, local_license

    report = progress or (lambda event: None)
    if not options.allow_local and any(ref.local for ref in recipe.referenced_models()):
        raise ModelError("local model folders are not allowed here; name models by their Hub repo ID")
    outtype, quants = _split_gguf_types(options.gguf)
    ensure_output_free(options.out_dir, overwrite=options.overwrite)
    if options.push:
        from .hub import check_write_access, validate_repo_id

        validate_repo_id(options.push)
        check_write_access(options.push, token=options.token)
    if not options.skip_check:
        _check_or_raise(recipe, options, report)
    folders, remotes = _fetch(recipe, options, report, cancel)
    local = {ref: ModelRef(str(folder), None, True) for ref, folder in folders.items()}
    local_recipe = recipe.with_models(local)
    local_folders = {local[ref]: folder for ref, folder in folders.items()}
    parents = [remotes[ref].parent_info() if ref in remotes else
               ParentInfo(ref.display_name, None, local_license(folders[ref]), local=True)
               for ref in recipe.referenced_models()]
    output_name = options.push or options.out_dir.name
    ggufs: list[Path] = []
    sanity: dict[str, str] = {}

    gguf_name = output_name.split("/")[-1]
    streamed: list[Path] = []

    def gguf_stream(tmp: Path, plan: MergePlan, config: dict) -> list[Any]:
        """The unquantized GGUF, written from the merged tensors as they are produced: one pass."""
        from quantize.convert import GGUFStream, gguf_file_name
        from quantize.llama import base_gguf_type

        base_type = base_gguf_type(outtype, quants)
        streamed.append(tmp / gguf_file_name(gguf_name, base_type))
        return [GGUFStream(streamed[0], config, tmp, [(o.name, o.shape) for o in plan.outputs], base_type,
                           name=gguf_name)]

    def finalize(tmp: Path, plan: MergePlan) -> list[str]:
        files: list[str] = []
        if options.gguf:
            from quantize.llama import export_gguf

            ggufs.extend(export_gguf(tmp, tmp, gguf_name, outtype, quants, converted=streamed[0],
                                     cancel=lambda: bool(cancel and cancel.is_set()),
                                     progress=lambda msg, frac: report(Event("gguf", frac, msg))))
            files += [p.name for p in ggufs]
            sanity.update(_verify(ggufs, tmp, plan, report))
        card = build_card(recipe, parents=parents, output_name=output_name,
                          gguf_files=[GGUFFileInfo.from_path(p) for p in ggufs],
                          gguf_repo=(f"{options.push}-GGUF" if options.push and options.gguf_repo else None),
                          sanity=sanity or None, seed=options.seed)
        (tmp / "README.md").write_text(str(card), encoding="utf-8")
        return files + ["README.md"]

    result = merge_local(local_recipe, local_folders, options.out_dir, device=options.device, seed=options.seed,
                         shard_size=options.shard_size, allow_bin=options.allow_bin, overwrite=options.overwrite,
                         progress=report, cancel=cancel, before_commit=finalize,
                         extra_sinks=gguf_stream if options.gguf else None)
    result.gguf_files = [result.out_dir / p.name for p in ggufs]
    result.sanity = sanity or None
    if options.push:
        from .hub import push_folder

        def on_upload(done: int, total: int | None) -> None:
            report(Event("upload", done / total if total else 0.0, options.push, done, total or 0))
            _cancelled(cancel)  # raised inside push_folder, which deletes a repo it created

        try:
            _cancelled(cancel)
            pushed = push_folder(result.out_dir, options.push, token=options.token, private=options.private,
                                 overwrite=options.overwrite_repo, gguf_files=result.gguf_files,
                                 gguf_repo=None if options.gguf_repo else options.push, progress=on_upload)
        except CancelledError:
            shutil.rmtree(result.out_dir, ignore_errors=True)  # a cancelled job leaves nothing, as documented
            raise
        result.pushed = [pushed.repo_url] + ([pushed.gguf_repo_url] if pushed.gguf_repo_url else [])
        report(Event("upload", 1.0, "pushed " + ", ".join(result.pushed)))
    return result


def _verify(ggufs: list[Path], folder: Path, plan: MergePlan, report: EventCallback) -> dict[str, str]:
    """Load each GGUF in llama.cpp: logits vs the merged model, perplexity, a sample generation."""
    from quantize.llama import verify_gguf

    params = sum(math.prod(o.shape) for o in plan.outputs)
    if params > VERIFY_MAX_PARAMS:
        return {"GGUF verification": f"skipped for {params / 1e9:.1f}B parameters (CPU reference forward); "
                                     "run `python -m quantize` with verification on a larger machine"}
    out: dict[str, str] = {}
    for i, path in enumerate(p for p in ggufs if p.suffix == ".gguf" and "-of-" not in p.name):
        report(Event("verify", i / len(ggufs), f"loading {path.name} in llama.cpp"))
        v = verify_gguf(path, folder)
        out[path.name] = (f"loads in llama.cpp; logits vs merged model: max rel. error {v.max_rel_error:.2e}; "
                          f"perplexity {v.perplexity:.2f} (merged model {v.reference_perplexity:.2f}); "
                          f"sample: {v.sample.strip()!r}")
    report(Event("verify", 1.0, "GGUF files verified"))
    return out
