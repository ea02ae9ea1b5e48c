"""The step between the fetch and the push: merge, GGUF (+ verification), evaluation and model card.

It is what needs the GPU, so it is one function of plain inputs (`Finish`): pipeline.run calls it here,
a ZeroGPU window runs it in its own process (the inputs pickle when the parents are on disk and nothing
uploads early), and a Hugging Face Job runs pipeline.run itself, so every place runs the same steps.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .engine import MergePlan
from .errors import GGUFError
from .moe import is_moe
from .pipeline import Event, EventCallback, RunOptions, RunResult, merge_local, split_gguf_types
from .recipe import ModelRef, Recipe


@dataclass
class Finish:
    """What the step needs besides the options: the recipe as published (card, mergekit_config.yml),
    the same recipe over local folders, the card's parents and family tree, and the parents to score."""

    published: Recipe
    local_recipe: Recipe
    local_folders: Mapping[ModelRef, Path]
    parents: list[Any]  # card.ParentInfo, in recipe order
    lineage: Any = None  # lineage.Lineage of the new merge, or None
    scored: Mapping[str, Path] = field(default_factory=dict)  # parent name -> folder with its weights
    unscored: tuple[str, ...] = ()  # parents whose weights were streamed, not downloaded: not evaluated
    infos: Mapping[ModelRef, Any] | None = None  # streamed parents: ModelInfo from the pinned headers
    open_readers: Callable[[MergePlan], Mapping[ModelRef, Any]] | None = None  # ... and their range readers
    uploader: Any = None  # merger.upload.ShardUploader: finished files upload while the merge goes on


def merge_and_finish(work: Finish, options: RunOptions, report: EventCallback,
                     cancel: threading.Event | None) -> RunResult:
    """Merge into options.out_dir with the GGUF files, their verification, the evaluation and the card."""
    from .card import GGUFFileInfo, build_card

    merge: Callable[..., RunResult] = merge_local
    streaming = {"infos": work.infos, "open_readers": work.open_readers,
                 "on_shard": work.uploader.add if work.uploader is not None else None}
    if is_moe(work.local_recipe):  # a mergekit-moe config: assembled from parents on disk, its own card
        from .moe.assemble import merge_moe_local as merge
        from .moe.card import build_moe_card as build_card

        streaming = {}
    outtype, quants = split_gguf_types(options.gguf)
    output_name = options.push or options.out_dir.name
    gguf_name = output_name.split("/")[-1]
    ggufs: list[Path] = []
    sanity: dict[str, str] = {}
    warnings: list[str] = []
    quality: list[Any] = []
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
            if work.uploader is not None and not options.gguf_repo:  # they go to the model's repo: upload now
                for path in ggufs:
                    work.uploader.add(path)
        if options.evaluate:
            _evaluate(tmp, work, options, merged_sample, quality, warnings, report, cancel)
        card = build_card(work.published, parents=work.parents, output_name=output_name,
                          gguf_files=[GGUFFileInfo.from_path(p) for p in ggufs],
                          gguf_repo=(f"{options.push}-GGUF" if options.push and options.gguf_repo else None),
                          sanity=sanity or None, seed=options.seed,
                          evaluation=quality[0].markdown() if quality else None, lineage=work.lineage,
                          remixed_from=options.remixed_from)
        (tmp / "README.md").write_text(str(card), encoding="utf-8")
        return files + ["README.md"]

    result = merge(work.local_recipe, work.local_folders, options.out_dir, device=options.device,
                   seed=options.seed, shard_size=options.shard_size, allow_bin=options.allow_bin,
                   overwrite=options.overwrite, progress=report, cancel=cancel, before_commit=finalize,
                   extra_sinks=gguf_stream if options.gguf else None, max_memory=options.max_memory, **streaming)
    result.gguf_files = [result.out_dir / p.name for p in ggufs]
    result.sanity = sanity or None
    result.warnings += warnings
    result.quality = quality[0] if quality else None
    return result


def _evaluate(folder: Path, work: Finish, options: RunOptions, merged_sample: str | None, quality: list[Any],
              warnings: list[str], report: EventCallback, cancel: threading.Event | None) -> None:
    """Perplexity of the merge and of each parent whose weights are on disk; the "looks broken" verdict."""
    from .eval.quality import evaluate_merge

    try:
        scored = evaluate_merge(
            folder, work.scored, token_budget=options.eval_tokens, merged_sample=merged_sample,
            cancel=lambda: bool(cancel and cancel.is_set()), device=_eval_device(options.device),
            progress=lambda msg, frac: report(Event("evaluate", frac, msg)))
    except GGUFError as e:  # no reference forward for this model: say so, the merge stands
        warnings.append(f"evaluation skipped: {e}")
        return
    if work.unscored:
        scored = dataclasses.replace(scored, notes=scored.notes + tuple(
            f"{name} not scored: its weights were streamed from the Hub, not downloaded" for name in work.unscored))
    quality.append(scored)
    if scored.verdict:
        warnings.append(scored.verdict)


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
