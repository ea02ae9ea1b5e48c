"""check -> fetch -> merge -> gguf -> card -> push, reported as events for the app and the CLI.

Everything a job writes lives in a temporary folder until the end; on any error or a cancel it is
removed, so a failure never leaves a half-written output folder or a half-pushed repository.
"""

from __future__ import annotations

import dataclasses
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
from .errors import CancelledError, GGUFError, MergerError, ModelError
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
                max_memory: int | None = None) -> RunResult:
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
        readers = {ref: _reader(ref, folders[ref], infos[ref], allow_bin) for ref in infos}
        writer = ShardedWriter(tmp, [PlannedTensor(o.name, o.dtype, o.shape) for o in plan.outputs],
                               shard_size=shard_size, metadata={"mergekit_method": recipe.method})
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

def check(recipe: Recipe, *, token: str | None = None, gguf: tuple[str, ...] = (), allow_bin: bool = False,
          max_memory: int | None = None, out_dir: Path | None = None, on_space: bool = False,
          strict: bool = False):
    """The pre-flight report (merger.check.CheckReport): configs and headers only, no weights.

    With `out_dir`, the disk estimate is also compared with the free space where the output and the
    download cache will be (an error when it does not fit)."""
    from .check import check_recipe
    from .moe import is_moe

    if is_moe(recipe):  # mergekit-moe config
        from .moe.check import check_moe

        report = check_moe(recipe, token=token, gguf_types=list(gguf) or None, allow_bin=allow_bin,
                           max_memory=max_memory, strict=strict)
    else:
        report = check_recipe(recipe, token=token, gguf_types=list(gguf) or None, allow_bin=allow_bin,
                              max_memory=max_memory, strict=strict)
    if out_dir is not None and report.estimates is not None:
        from .disk import disk_problem
        from .hub import cached_bytes, hub_cache_dir

        def cached() -> int:
            try:
                return sum(cached_bytes(ref, token=token) for ref in recipe.referenced_models() if not ref.local)
            except MergerError:  # the cache cannot be credited: judge by the whole download
                return 0

        problem = disk_problem(report.estimates, out_dir=out_dir, cache_dir=hub_cache_dir(), cached=cached,
                               on_space=on_space)
        if problem is not None:
            report.problems.append(problem)
    return report


def _check_or_raise(recipe: Recipe, options: RunOptions, progress: EventCallback) -> None:
    progress(Event("check", 0.0, "checking the recipe and the models (no weights are downloaded)"))
    report = check(recipe, token=options.token, gguf=options.gguf, allow_bin=options.allow_bin,
                   max_memory=options.max_memory, out_dir=options.out_dir,
                   on_space=not options.allow_local,  # Hub models only: a Space
                   strict=options.strict)
    errors = [p for p in report.problems if p.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more problem(s); `python -m merger check` lists them)" if len(errors) > 1 else ""
        fix = f"; {errors[0].fix}" if errors[0].fix else ""
        raise ModelError(f"pre-flight check failed: {errors[0].message}{fix}{more}")
    progress(Event("check", 1.0, "check passed"))


def _fetch(recipe: Recipe, options: RunOptions, progress: EventCallback, cancel: threading.Event | None
           ) -> tuple[dict[ModelRef, Path], dict[ModelRef, object], dict[ModelRef, Path]]:
    """Local folders of every model, and of the LoRA adapters applied to them: Hub models and adapters
    are pinned to a commit and downloaded (cached)."""
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

        def on_bytes(done: int, total: int | None, i: int = i, ref: ModelRef = ref) -> None:
            _cancelled(cancel)
            part = done / total if total else 0.0
            progress(Event("download", (i + part) / len(refs), f"{ref}", done, total or 0))

        remote, folder = hub.fetch_model(ref, token=options.token, allow_bin=options.allow_bin, progress=on_bytes)
        folders[ref], parents[ref] = folder, remote
    progress(Event("download", 1.0, "all models are available locally"))
    return folders, parents, adapters


def _lineage(recipe: Recipe, output_name: str, options: RunOptions) -> Any:
    """The family tree of the new merge from its Hub parents' cards (None without Hub parents)."""
    hub_parents = [ref.repo for ref in recipe.referenced_models() if not ref.local]
    if not options.lineage or not hub_parents:
        return None
    from .lineage import merge_lineage

    return merge_lineage(output_name, recipe.method, hub_parents, token=options.token)


def _split_gguf_types(types: tuple[str, ...]) -> tuple[str | None, list[str]]:
    floats = [FLOAT_GGUF_TYPES[t] for t in types if t in FLOAT_GGUF_TYPES]
    quants = [t for t in types if t not in FLOAT_GGUF_TYPES]
    if len(floats) > 1:
        raise ModelError("ask for at most one unquantized GGUF type (F16, BF16 or F32) per run")
    return (floats[0] if floats else None), quants


def run(recipe: Recipe, options: RunOptions, *, progress: EventCallback | None = None,
        cancel: threading.Event | None = None) -> RunResult:
    """The whole job: check, fetch, merge, GGUF (+ verification), card, push. Nothing half-done on failure."""
    from .card import GGUFFileInfo, ParentInfo, build_card, hub_origin, local_license, publishable_recipe
    from .moe import is_moe

    merge = merge_local
    if is_moe(recipe):  # a mergekit-moe config: assembled, not merged; its own card
        from .moe.assemble import merge_moe_local as merge
        from .moe.card import build_moe_card as build_card

    report = progress or (lambda event: None)
    if not options.allow_local and any(ref.local or (ref.lora is not None and ref.lora.local)
                                       for ref in recipe.referenced_models()):
        raise ModelError("local model folders are not allowed here; name models by their Hub repo ID")
    outtype, quants = _split_gguf_types(options.gguf)
    ensure_output_free(options.out_dir, overwrite=options.overwrite)
    published = recipe  # what the card and mergekit_config.yml say: no local paths in a pushed repo
    if options.push:
        from .hub import check_write_access, validate_repo_id

        published = publishable_recipe(recipe, allow_local_paths=options.allow_local_paths)
        validate_repo_id(options.push)
        check_write_access(options.push, token=options.token)
    if not options.skip_check:
        _check_or_raise(recipe, options, report)
    folders, remotes, adapters = _fetch(recipe, options, report, cancel)
    local = {ref: ModelRef(str(folder), None, True,
                           ModelRef(str(adapters[ref]), None, True) if ref in adapters else None)
             for ref, folder in folders.items()}
    local_recipe = dataclasses.replace(recipe.with_models(local), text=published.text)
    local_folders = {local[ref]: folder for ref, folder in folders.items()}

    def parent(ref: ModelRef) -> ParentInfo:
        if ref in remotes:
            return remotes[ref].parent_info()
        origin = hub_origin(ref.repo) if published is not recipe else None
        if origin is not None:  # a Hub-cache snapshot, published under its repo ID and commit
            return ParentInfo(origin.repo, origin.revision, local_license(folders[ref]))
        return ParentInfo(ref.display_name, None, local_license(folders[ref]), local=True)

    parents = [parent(ref) for ref in recipe.referenced_models()]
    output_name = options.push or options.out_dir.name
    tree = _lineage(recipe, output_name, options)
    ggufs: list[Path] = []
    sanity: dict[str, str] = {}
    warnings: list[str] = []

    gguf_name = output_name.split("/")[-1]
    streamed: list[Path] = []

    def gguf_stream(tmp: Path, plan: MergePlan, config: dict) -> list[Any]:
        """The unquantized GGUF, written from the merged tensors as they are produced: one pass. A family
        the streaming converter does not cover is converted from the finished folder instead."""
        from quantize.convert import GGUFStream, gguf_file_name, stream_reason
        from quantize.llama import base_gguf_type

        if stream_reason(config) is not None:
            return []
        base_type = base_gguf_type(outtype, quants)
        streamed.append(tmp / gguf_file_name(gguf_name, base_type))
        return [GGUFStream(streamed[0], config, tmp, [(o.name, o.shape) for o in plan.outputs], base_type,
                           name=gguf_name)]

    quality: list[Any] = []

    def finalize(tmp: Path, plan: MergePlan) -> list[str]:
        files: list[str] = []
        merged_sample = None
        if options.gguf:
            measurements = _export_and_verify(tmp, gguf_name, outtype, quants, streamed[0] if streamed else None,
                                              options, report, cancel)
            failed = [m for m in measurements if not m.passed]
            if failed and not options.drop_failing_gguf:
                raise GGUFError(f"GGUF verification failed: {failed[0].reason} (--gguf-drop-failing keeps "
                                "failing files out of the output instead)")
            for m in measurements:
                produced = sorted(tmp.glob(m.file[:-len(".gguf")] + "*.gguf"))
                if m.passed:
                    ggufs.extend(produced)
                    notice = _fallback_notice(produced, m.gguf_type)
                    if notice:
                        warnings.append(notice)
                else:
                    for path in produced:
                        path.unlink()
                    warnings.append(f"{m.file} was kept out: {m.reason}")
                sanity[m.file] = m.summary() + ("" if produced or not m.passed else " (intermediate, not kept)")
            merged_sample = next((m.sample for m in measurements if m.reference == "safetensors model"), None)
            files += [p.name for p in ggufs]
        if options.evaluate:
            from .eval.quality import evaluate_merge

            parent_dirs = {ref.display_name: folders[ref] for ref in recipe.referenced_models()}
            try:
                quality.append(evaluate_merge(
                    tmp, parent_dirs, token_budget=options.eval_tokens, merged_sample=merged_sample,
                    cancel=lambda: bool(cancel and cancel.is_set()), device=_eval_device(options.device),
                    progress=lambda msg, frac: report(Event("evaluate", frac, msg))))
            except GGUFError as e:  # no reference forward for this model: say so, the merge stands
                warnings.append(f"evaluation skipped: {e}")
            if quality and quality[0].verdict:
                warnings.append(quality[0].verdict)
        card = build_card(published, parents=parents, output_name=output_name,
                          gguf_files=[GGUFFileInfo.from_path(p) for p in ggufs],
                          gguf_repo=(f"{options.push}-GGUF" if options.push and options.gguf_repo else None),
                          sanity=sanity or None, seed=options.seed,
                          evaluation=quality[0].markdown() if quality else None, lineage=tree,
                          remixed_from=options.remixed_from)
        (tmp / "README.md").write_text(str(card), encoding="utf-8")
        return files + ["README.md"]

    result = merge(local_recipe, local_folders, options.out_dir, device=options.device, seed=options.seed,
                         shard_size=options.shard_size, allow_bin=options.allow_bin, overwrite=options.overwrite,
                         progress=report, cancel=cancel, before_commit=finalize,
                         extra_sinks=gguf_stream if options.gguf else None, max_memory=options.max_memory)
    result.gguf_files = [result.out_dir / p.name for p in ggufs]
    result.sanity = sanity or None
    result.warnings += warnings
    result.quality = quality[0] if quality else None
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


def _fallback_notice(paths: list[Path], gguf_type: str) -> str | None:
    """llama.cpp's fallback-quantization notice for a produced file (its first part), read from the file."""
    from quantize.llama import fallback_notice

    return fallback_notice(paths[0], gguf_type) if paths else None


def _eval_device(device: str) -> str:
    """Where the torch reference forwards of verification and evaluation run: the merge's device."""
    from .engine import resolve_device

    return str(resolve_device(device))


def _export_and_verify(folder: Path, name: str, outtype: str | None, quants: list[str], streamed: Path | None,
                       options: RunOptions, report: EventCallback, cancel: threading.Event | None) -> list[Any]:
    """Quantize from the streamed base GGUF, measuring each file in llama.cpp as soon as it exists (the base
    against the merged safetensors, each quantized file against the base): quantize.verify.Measurement."""
    from quantize.llama import export_gguf
    from quantize.verify import Verifier

    from .eval.text import eval_sections

    stop = (lambda: bool(cancel and cancel.is_set()))
    verifier = Verifier(folder, eval_sections(), token_budget=options.eval_tokens, cancel=stop,
                        device=_eval_device(options.device))
    measurements = []
    total = 1 + len(quants)

    def verify(path: Path, kind: str) -> None:
        report(Event("verify", len(measurements) / total, f"measuring {path.name} in llama.cpp"))
        first = not measurements
        measurements.append(verifier.base(path, kind) if first else verifier.quantized(path, kind))

    export_gguf(folder, folder, name, outtype, quants, converted=streamed, cancel=stop, verify=verify,
                progress=lambda msg, frac: report(Event("gguf", frac, msg)))
    report(Event("verify", 1.0, "GGUF files verified"))
    return measurements
