"""check -> fetch or stream -> merge -> gguf -> eval -> card -> push, as events for the app and the CLI.

Everything a job writes lives in a temporary folder until the end; on any error or a cancel it is
removed, so a failure never leaves a half-written output folder or a half-pushed repository.
"""

from __future__ import annotations

import dataclasses
import functools
import json
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
    allow_local_paths: bool = False  # a push may publish local folder paths of parents with no Hub origin
    skip_check: bool = False
    max_memory: int | None = None  # working-memory budget in bytes; None: derived from the device
    evaluate: bool = True  # perplexity of the merge and of each parent, samples, the "looks broken" verdict
    drop_failing_gguf: bool = False  # a GGUF file that fails verification is kept out instead of failing the run
    eval_tokens: int = 256  # token budget of GGUF verification and of the evaluation
    lineage: bool = True  # read the Hub parents' family tree into the card
    remixed_from: str | None = None  # the Hub model whose recipe this one remixes, linked from the card
    stream: bool | None = None  # read parents from the Hub by range requests; None: on a Space when disk is short
    # Hub models already on disk at a pinned commit (a Hugging Face Job's read-only Volumes):
    # str(ref) as the recipe writes it -> (commit sha, folder)
    mounted: Mapping[str, tuple[str, str]] = field(default_factory=dict)
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
    quality: Any = None  # merger.eval.quality.QualityReport when the run evaluated the merge
    streamed: bool = False


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
                before_commit: Callable[[Path, MergePlan], list[str]] | None = None,
                max_memory: int | None = None,
                infos: Mapping[ModelRef, arch.ModelInfo] | None = None,
                open_readers: Callable[[MergePlan], Mapping[ModelRef, Any]] | None = None,
                on_shard: Callable[[Path], None] | None = None) -> RunResult:
    """Merge models already on disk into out_dir (mergekit's layout), atomically.

    `extra_sinks(tmp, plan, config)` may add outputs fed with every merged tensor as it is produced
    (objects with write(name, tensor), close() and abort(), e.g. a GGUF stream); the tokenizer files
    are in `tmp` before the merge starts, config.json is written only after it (a folder killed
    mid-merge has no config, so nothing can load it). `infos` and `open_readers(plan)` replace reading
    the folders' weights (parents streamed from the Hub); `on_shard(path)` gets each finished shard.
    """
    started = time.monotonic()
    infos = infos if infos is not None else inspect_models(recipe, folders, allow_bin=allow_bin)
    vocabs = union = None
    if recipe.tokenizer_source is not None:
        vocabs = {ref: v for ref in infos if (v := load_vocab(folders[ref])) is not None}
    if recipe.tokenizer_source == "union":
        union = _union(recipe, infos, folders)
    if recipe.tokens:
        union = _with_new_tokens(recipe, union, vocabs, infos)
    plan = plan_merge(recipe, infos, vocabs=vocabs, union_vocab=union.vocab if union else None)
    tmp = prepare_output(out_dir, overwrite=overwrite)
    readers = {}
    sinks: list[Any] = []
    try:
        config = arch.output_config(infos[plan.reference].config, num_layers=plan.num_layers,
                                    vocab_size=plan.vocab_size, dtype=plan.out_dtype,
                                    tie_word_embeddings=plan.tie_word_embeddings, layer_sources=plan.layer_sources)
        files = _write_tokenizer_and_recipe(recipe, plan, folders, tmp, union)
        readers = dict(open_readers(plan)) if open_readers is not None else {
            ref: _reader(ref, folders[ref], infos[ref], allow_bin) for ref in infos}
        writer = ShardedWriter(tmp, [PlannedTensor(o.name, o.dtype, o.shape) for o in plan.outputs],
                               shard_size=shard_size, metadata={"mergekit_method": recipe.method},
                               on_shard=on_shard)
        sinks = extra_sinks(tmp, plan, config) if extra_sinks is not None else []

        def on_progress(p: Progress) -> None:
            if progress:
                progress(Event("merge", p.done / max(p.total, 1), p.message, p.bytes_done, p.bytes_total))

        MergeRunner(plan, readers, device=device, seed=seed, progress=on_progress, cancel=cancel,
                    max_memory=max_memory).run([sink.write for sink in sinks], part_sinks=[writer.write_part])
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


def _reader(ref: ModelRef, folder: Path, info: arch.ModelInfo, allow_bin: bool) -> Any:
    """The model's tensor reader; with the adapter of a `model+lora` reference applied (merger.lora)."""
    reader = open_reader(folder, allow_bin=allow_bin)
    if ref.lora is None:
        return reader
    from .lora import AdaptedReader, adapter_problems, load_local_adapter, stored_shapes

    try:
        if not ref.lora.local:
            raise ModelError(f"{ref.lora} is a Hub adapter; fetching is needed first")
        adapter = load_local_adapter(ref.lora.repo, ref.lora.display_name)
        problems = adapter_problems(adapter, stored_shapes(info.tensors))
        if problems:
            raise ModelError(problems[0])
    except BaseException:
        reader.close()
        raise
    return AdaptedReader(reader, ref.lora.repo, adapter)


def _union(recipe: Recipe, infos: Mapping[ModelRef, arch.ModelInfo], folders: Mapping[ModelRef, Path]):
    """The union tokenizer of every merged model, the base's (or the first model's) first."""
    from .tokenizer import build_union

    refs = recipe.referenced_models()  # base first, then in order of appearance
    rows = {ref: infos[ref].vocab_size or infos[ref].embedding_rows or 0 for ref in refs}
    return build_union(folders[refs[0]], rows[refs[0]], [(folders[r], rows[r]) for r in refs[1:]])


def _with_new_tokens(recipe: Recipe, union: Any, vocabs: Mapping[ModelRef, Mapping[str, int]],
                     infos: Mapping[ModelRef, arch.ModelInfo]) -> Any:
    """The output vocabulary plus each `tokenizer.tokens` key it lacks, appended in recipe order as
    plain added tokens (mergekit 0.1.5 adds them with add_tokens); None when nothing is new and the
    source's own tokenizer is the output's."""
    from .engine import _usable_vocab
    from .tokenizer import UnionTokenizer

    if union is None:
        source = recipe.tokenizer_source
        src = source if isinstance(source, ModelRef) else (recipe.base_model or recipe.referenced_models()[0])
        if src not in vocabs or src not in infos:
            return None  # the plan says what is missing
        vocab = _usable_vocab(vocabs[src], infos[src])
        if all(token in vocab for token, _ in recipe.tokens):
            return None
        union = UnionTokenizer(vocab, ())
    vocab, appended = dict(union.vocab), list(union.appended)
    for token, _ in recipe.tokens:
        if token not in vocab:
            vocab[token] = len(vocab)
            appended.append({"id": vocab[token], "content": token, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": True, "special": False})
    return UnionTokenizer(vocab, tuple(appended))


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
    if recipe.tokenizer_source == "union":
        tok_src = recipe.referenced_models()[0]
    if union is not None:
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


def check(recipe: Recipe, *, token: str | None = None, gguf: tuple[str, ...] = (), allow_bin: bool = False,
          max_memory: int | None = None, out_dir: Path | None = None, on_space: bool = False,
          inspect: Callable[[ModelRef], Any] | None = None, stream: bool | None = False,
          strict: bool = False):
    """The pre-flight report (merger.check.CheckReport): configs and headers only, no weights.

    With `out_dir`, the disk estimate is also compared with the free space where the output and the
    download cache will be (an error when it does not fit). Streamed parents (`stream`) take no disk;
    `stream=None` streams on a Space when the download would not fit but the output would
    (`report.stream` says what was decided)."""
    from .check import NOTE, Problem, check_recipe
    from .moe import is_moe

    if is_moe(recipe):  # mergekit-moe config
        from .moe.check import check_moe as check_recipe
    report = check_recipe(recipe, token=token, gguf_types=list(gguf) or None, allow_bin=allow_bin,
                          max_memory=max_memory, inspect=inspect, strict=strict)
    hub_models = any(not ref.local for ref in recipe.referenced_models())
    report.stream = bool(stream) and hub_models
    if out_dir is not None and report.estimates is not None:
        problem = disk_problem(recipe, report.estimates, token=token, out_dir=out_dir, on_space=on_space,
                               stream=report.stream)
        if problem is not None and stream is None and on_space and hub_models:
            report.stream = True
            problem = disk_problem(recipe, report.estimates, token=token, out_dir=out_dir, on_space=on_space,
                                   stream=True)
            if problem is None:
                report.problems.append(Problem(NOTE, "the parents' download would not fit the free disk: their "
                                                     "weights will be streamed from the Hub while merging"))
        if problem is not None:
            report.problems.append(problem)
    return report


def disk_problem(recipe: Recipe, estimates: Any, *, token: str | None, out_dir: Path, on_space: bool,
                 stream: bool) -> Any:
    """merger.disk's verdict for this recipe (None when it fits), crediting parents already in the cache."""
    from .disk import disk_problem as verdict
    from .hub import cached_bytes, hub_cache_dir

    if stream:
        estimates = dataclasses.replace(estimates, download_bytes=0)

    def cached() -> int:
        try:
            return sum(cached_bytes(ref, token=token) for ref in recipe.referenced_models() if not ref.local)
        except MergerError:  # the cache cannot be credited: judge by the whole download
            return 0

    return verdict(estimates, out_dir=out_dir, cache_dir=hub_cache_dir(), cached=cached, on_space=on_space)


def _check_or_raise(recipe: Recipe, options: RunOptions, progress: EventCallback) -> tuple[dict[ModelRef, Any], bool]:
    """The Hub models the check read, each pinned to the commit the merge will use, and whether to stream
    them: as asked, else on a Space when the download would not fit the disk but the output would."""
    from .streaming import pin_parents, pinned_inspector

    progress(Event("check", 0.0, "checking the recipe and the models (no weights are downloaded)"))
    pinned = pin_parents(recipe, token=options.token)
    report = check(recipe, token=options.token, gguf=options.gguf, allow_bin=options.allow_bin,
                   max_memory=options.max_memory, out_dir=options.out_dir,
                   on_space=not options.allow_local,  # Hub models only: a Space
                   inspect=pinned_inspector(pinned, token=options.token, allow_bin=options.allow_bin),
                   stream=options.stream, strict=options.strict)
    errors = [p for p in report.problems if p.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more problem(s); `python -m merger check` lists them)" if len(errors) > 1 else ""
        fix = f"; {errors[0].fix}" if errors[0].fix else ""
        raise ModelError(f"pre-flight check failed: {errors[0].message}{fix}{more}")
    progress(Event("check", 1.0, "check passed" + (" (the parents will be streamed: their download would not "
                                                   "fit the disk)" if report.stream and not options.stream else "")))
    return pinned, report.stream


def _fetch(recipe: Recipe, options: RunOptions, progress: EventCallback, cancel: threading.Event | None,
           pinned: dict[ModelRef, Any], *, stream: bool
           ) -> tuple[dict[ModelRef, Path], dict[ModelRef, object], dict[ModelRef, Path]]:
    """Local folders of every model, and of the LoRA adapters applied to them: Hub models at their
    pinned commit, downloaded (cached) or, when streamed, with their configs and tokenizer only (`pinned`
    then gains every Hub model's metadata). Adapters are pinned and downloaded (they are small)."""
    from . import hub

    folders: dict[ModelRef, Path] = {}
    parents: dict[ModelRef, object] = {}
    adapters: dict[ModelRef, Path] = {}
    refs = recipe.referenced_models()
    for i, ref in enumerate(refs):
        _cancelled(cancel)
        if ref.lora is not None:
            adapters[ref] = Path(ref.lora.repo) if ref.lora.local else hub.fetch_adapter(ref.lora, token=options.token)
        if ref.local:
            folders[ref] = Path(ref.repo)
            continue

        if str(ref) in options.mounted:  # pinned and on disk already: only the lineage is asked of the Hub
            sha, folder = options.mounted[str(ref)]
            parents[ref] = hub.resolve(ModelRef(ref.repo, sha), token=options.token)
            folders[ref] = Path(folder)
            continue

        def on_bytes(done: int, total: int | None, i: int = i, ref: ModelRef = ref) -> None:
            _cancelled(cancel)
            part = done / total if total else 0.0
            progress(Event("download", (i + part) / len(refs), f"{ref}", done, total or 0))

        if stream and ref not in pinned:
            pinned[ref] = hub.read_metadata(hub.resolve(ref, token=options.token), token=options.token)
        remote = pinned[ref].model if ref in pinned else hub.resolve(ref, token=options.token)
        folders[ref] = hub.download(remote, token=options.token, allow_bin=options.allow_bin,
                                    progress=None if stream else on_bytes, weights=not stream)
        parents[ref] = remote
    progress(Event("download", 1.0, "weights will be streamed from the Hub while merging" if stream and parents
                   else "all models are available locally"))
    return folders, parents, adapters


def _lineage(recipe: Recipe, output_name: str, options: RunOptions) -> Any:
    """The family tree of the new merge from its Hub parents' cards (None without Hub parents)."""
    hub_parents = [ref.repo for ref in recipe.referenced_models() if not ref.local]
    if not options.lineage or not hub_parents:
        return None
    from .lineage import merge_lineage

    return merge_lineage(output_name, recipe.method, hub_parents, token=options.token)


def split_gguf_types(types: tuple[str, ...]) -> tuple[str | None, list[str]]:
    floats = [FLOAT_GGUF_TYPES[t] for t in types if t in FLOAT_GGUF_TYPES]
    quants = [t for t in types if t not in FLOAT_GGUF_TYPES]
    if len(floats) > 1:
        raise ModelError("ask for at most one unquantized GGUF type (F16, BF16 or F32) per run")
    return (floats[0] if floats else None), quants


StepRunner = Callable[..., RunResult]  # (step, progress, cancel) -> step's result; step(progress, cancel)


def run(recipe: Recipe, options: RunOptions, *, progress: EventCallback | None = None,
        cancel: threading.Event | None = None, merge_runner: StepRunner | None = None) -> RunResult:
    """The whole job: check, fetch, merge, GGUF (+ verification), evaluation, card, push. Nothing half-done
    on failure.

    `merge_runner(step, progress, cancel)` runs the merge step (finish.merge_and_finish with its inputs
    bound) somewhere else, e.g. inside a ZeroGPU window; by default it runs here. Such a step reads the
    parents from disk (no streaming inside a GPU window) and its shards upload at the push, not before.
    """
    from .card import ParentInfo, hub_origin, local_license, publishable_recipe
    from .finish import Finish, merge_and_finish
    from .moe import is_moe

    report = progress or (lambda event: None)
    refs = recipe.referenced_models()
    # a GPU window (merge_runner) reads parents from disk; a mergekit-moe config is assembled from whole
    # tensors; a LoRA adapter is applied by the local reader
    if merge_runner is not None or is_moe(recipe) or any(ref.lora is not None for ref in refs):
        options = dataclasses.replace(options, stream=False)
    if not options.allow_local and any(ref.local or (ref.lora is not None and ref.lora.local) for ref in refs):
        raise ModelError("local model folders are not allowed here; name models by their Hub repo ID")
    split_gguf_types(options.gguf)  # refuses two unquantized types before anything starts
    ensure_output_free(options.out_dir, overwrite=options.overwrite)
    published = recipe  # what the card and mergekit_config.yml say: no local paths in a pushed repo
    if options.push:
        from .hub import check_write_access, validate_repo_id

        published = publishable_recipe(recipe, allow_local_paths=options.allow_local_paths)
        validate_repo_id(options.push)
        check_write_access(options.push, token=options.token)
    hub_models = any(not ref.local for ref in refs)
    pinned: dict[ModelRef, Any] = {}
    stream = bool(options.stream) and hub_models
    if not options.skip_check:  # one resolution per parent: the merge reads (or streams) what was checked
        pinned, stream = _check_or_raise(recipe, options, report)
    folders, remotes, adapters = _fetch(recipe, options, report, cancel, pinned, stream=stream)
    local = {ref: ModelRef(str(folder), None, True,
                           ModelRef(str(adapters[ref]), None, True) if ref in adapters else None)
             for ref, folder in folders.items()}
    local_folders = {local[ref]: folder for ref, folder in folders.items()}

    def parent(ref: ModelRef) -> ParentInfo:
        if ref in remotes:
            return remotes[ref].parent_info()
        origin = hub_origin(ref.repo) if published is not recipe else None
        if origin is not None:  # a Hub-cache snapshot, published under its repo ID and commit
            return ParentInfo(origin.repo, origin.revision, local_license(folders[ref]))
        return ParentInfo(ref.display_name, None, local_license(folders[ref]), local=True)

    streamed = [ref for ref in refs if stream and ref in pinned and str(ref) not in options.mounted]
    work = Finish(published=published,
                  local_recipe=dataclasses.replace(recipe.with_models(local), text=published.text),
                  local_folders=local_folders, parents=[parent(ref) for ref in refs],
                  lineage=_lineage(recipe, options.push or options.out_dir.name, options),
                  scored={ref.display_name: folders[ref] for ref in refs if ref not in streamed},
                  unscored=tuple(ref.display_name for ref in streamed))
    if stream:
        from .streaming import stream_readers, streamed_infos

        metas = {local[ref]: pinned[ref] for ref in streamed}
        work.infos = streamed_infos(metas, local_folders, allow_bin=options.allow_bin)
        work.open_readers = stream_readers(metas, local_folders, token=options.token,
                                           allow_bin=options.allow_bin, cancel=cancel)
    uploader = None
    if options.push and merge_runner is None and not is_moe(recipe):  # shards upload while merging
        from .upload import ShardUploader

        uploader = work.uploader = ShardUploader(options.push, token=options.token, private=options.private,
                                                 overwrite=options.overwrite_repo)
    step = functools.partial(merge_and_finish, work, options)
    try:
        result = step(report, cancel) if merge_runner is None else merge_runner(step, report, cancel)
    except BaseException:
        if uploader is not None:
            uploader.abort()
        raise
    result.streamed = stream
    if options.push:
        _push(result, options, report, cancel, uploader)
    return result


def _push(result: RunResult, options: RunOptions, report: EventCallback, cancel: threading.Event | None,
          uploader: Any) -> None:
    """The one commit of the merged folder (its shards mostly uploaded already); a failure or a cancel
    deletes a repository this run created."""
    from .hub import push_folder

    def on_upload(done: int, total: int | None) -> None:
        report(Event("upload", done / total if total else 0.0, options.push, done, total or 0))
        _cancelled(cancel)  # raised inside push_folder, which deletes a repo it created

    try:
        _cancelled(cancel)
        pushed = push_folder(result.out_dir, options.push, token=options.token, private=options.private,
                             overwrite=options.overwrite_repo, gguf_files=result.gguf_files,
                             gguf_repo=None if options.gguf_repo else options.push, progress=on_upload,
                             uploader=uploader)
    except BaseException as e:
        if uploader is not None:
            uploader.abort()  # deletes the repo only if this run created it and never committed to it
        if isinstance(e, CancelledError):
            shutil.rmtree(result.out_dir, ignore_errors=True)  # a cancelled job leaves nothing, as documented
        raise
    finally:
        if uploader is not None:
            uploader.close()
    result.pushed = [pushed.repo_url] + ([pushed.gguf_repo_url] if pushed.gguf_repo_url else [])
    report(Event("upload", 1.0, "pushed " + ", ".join(result.pushed)))
