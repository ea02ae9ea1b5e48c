"""Assembling a MoE checkpoint from local folders: routers first, then every tensor streamed to the shards.

The output folder is mergekit-moe's: config.json, sharded safetensors, the base model's tokenizer and
generation config, and the config verbatim as `mergekit_moe_config.yml`, written atomically like a merge
(merger.output). Memory is one tensor at a time, plus the base model in bfloat16 for `hidden` gates.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .. import architecture as arch
from ..card import MOE_RECIPE_FILE
from ..engine import resolve_device, tensor_seed
from ..errors import ModelError
from ..output import commit_output, copy_tokenizer, prepare_output, write_json
from ..pipeline import Event, RunResult, _cancelled, os_error_message
from ..recipe import ModelRef
from ..sources import TORCH_DTYPES, open_reader
from ..writer import DEFAULT_SHARD_SIZE, PlannedTensor, ShardedWriter
from .config import MoERecipe
from .gates import degenerate_layers, gate_vectors
from .plan import MoEOutput, MoEPlan, plan_moe



def expert_tensor(tensor: torch.Tensor, out: MoEOutput, seed: int) -> torch.Tensor:
    """An expert's MLP tensor with its noise_scale (seeded per tensor, so reproducible) and, for down_proj,
    its residual_scale applied, in the stored dtype as mergekit does."""
    e = out.expert
    if e is None:
        return tensor
    if e.noise_scale is not None:
        generator = torch.Generator().manual_seed(tensor_seed(seed, out.name))
        noise = torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
        tensor = tensor + noise * e.noise_scale
    if out.residual and e.residual_scale is not None:
        tensor = tensor * e.residual_scale
    return tensor


def merge_moe_local(recipe: MoERecipe, folders: Mapping[ModelRef, Path], out_dir: Path, *, device: str = "auto",
                    seed: int = 0, shard_size: int = DEFAULT_SHARD_SIZE, allow_bin: bool = False,
                    overwrite: bool = False, progress: Callable[[Any], None] | None = None,
                    cancel: threading.Event | None = None,
                    extra_sinks: Callable[[Path, MoEPlan, dict], list[Any]] | None = None,
                    before_commit: Callable[[Path, MoEPlan], list[str]] | None = None,
                    max_memory: int | None = None) -> Any:
    """Build the MoE of `recipe` from models on disk into out_dir, atomically (merger.pipeline.merge_local's
    contract: the same hooks, a RunResult whose plan is the MoEPlan). `max_memory` is accepted for that
    contract; a MoE copies whole tensors, so its working memory is the largest tensor."""
    started = time.monotonic()
    report = progress or (lambda event: None)
    infos = {ref: arch.inspect_local(folders[ref], ref=ref, allow_bin=allow_bin) for ref in recipe.referenced_models()}
    plan = plan_moe(recipe, infos)
    base_info = infos[recipe.base_model]
    torch_dtype = TORCH_DTYPES[plan.st_dtype]
    tmp = prepare_output(out_dir, overwrite=overwrite)
    readers: dict[ModelRef, Any] = {}
    sinks: list[Any] = []
    warnings = list(recipe.warnings) + list(plan.warnings)
    try:
        readers = {ref: open_reader(folders[ref], allow_bin=allow_bin) for ref in infos}

        def read(ref: ModelRef, name: str) -> torch.Tensor:
            t = infos[ref].tensors[name]
            return readers[ref].read(t.source_name, t.rows).reshape(t.shape)

        report(Event("gates", 0.0, f"computing the routers ({recipe.gate_mode})"))
        gates = gate_vectors(recipe, folders[recipe.base_model], num_layers=plan.num_layers, hidden=plan.hidden_size,
                             embed=lambda: read(recipe.base_model, base_info.family.embedding),
                             device=resolve_device(device), seed=seed)
        degenerate = degenerate_layers(gates)
        if degenerate:
            warnings.append(f"the routers of {len(degenerate)} of {plan.num_layers} layer(s) are nearly degenerate "
                            "(condition number above 5; mergekit's test): the prompts may be too similar, and some "
                            "experts will be underused")
        report(Event("gates", 1.0, "routers computed"))
        _cancelled(cancel)
        files = _write_side_files(recipe, folders[recipe.base_model], tmp)
        writer = ShardedWriter(tmp, [PlannedTensor(o.name, plan.st_dtype, o.shape) for o in plan.outputs],
                               shard_size=shard_size, metadata={"mergekit_method": "moe"})
        sinks = extra_sinks(tmp, plan, plan.config) if extra_sinks is not None else []
        n_routed = len(recipe.experts)
        done_bytes, total = 0, plan.total_bytes
        for i, out in enumerate(plan.outputs):
            _cancelled(cancel)
            if out.gate is not None:
                layer, which = out.gate
                rows = gates[layer, :n_routed] if which == "routed" else gates[layer, n_routed:]
                tensor = rows.to(torch_dtype).contiguous()
            elif out.source is None:
                tensor = torch.zeros(out.shape, dtype=torch_dtype)
            else:
                tensor = expert_tensor(read(out.source, out.source_name), out, seed).to(torch_dtype).contiguous()
            writer.write(out.name, tensor)
            for sink in sinks:
                sink.write(out.name, tensor)
            done_bytes += tensor.numel() * tensor.element_size()
            report(Event("merge", (i + 1) / len(plan.outputs), out.name, done_bytes, total))
        files += writer.finish()
        write_json(tmp / "config.json", plan.config)
        files.append("config.json")
        for sink in sinks:
            sink.close()
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
    return RunResult(out_dir.resolve(), sorted(set(files)), plan, warnings, seconds=time.monotonic() - started)


def _write_side_files(recipe: MoERecipe, base_folder: Path, tmp: Path) -> list[str]:
    """The base model's generation config and tokenizer, and the config as given."""
    files = []
    if (base_folder / "generation_config.json").is_file():
        shutil.copyfile(base_folder / "generation_config.json", tmp / "generation_config.json")
        files.append("generation_config.json")
    files += copy_tokenizer(base_folder, tmp, None)
    (tmp / MOE_RECIPE_FILE).write_text(recipe.text if recipe.text.endswith("\n") else recipe.text + "\n",
                                       encoding="utf-8")
    return files + [MOE_RECIPE_FILE]
