"""LoRA adapters in PEFT's format, applied to their model's weights as the weights are read.

This is what mergekit does with a `model+adapter` reference (PEFT's merge_and_unload before merging),
without writing the adapted model anywhere: a tensor the adapter changes is read from the model, and
its update is added on the way. For a linear module W' = W + s * B @ A (transposed for GPT-2's Conv1D,
`fan_in_fan_out`), for an embedding W' = W + s * (B @ A)^T, with s = lora_alpha / r, or
lora_alpha / sqrt(r) with `use_rslora`, r and lora_alpha overridable per module by `rank_pattern` /
`alpha_pattern`; a module listed in `modules_to_save` is replaced by the adapter's copy (as is an
adapted embedding by the copy PEFT saves beside its update). The arithmetic
is PEFT's (0.22): the update in float32, added to a linear weight in float32 and rounded once to the
weight's dtype; an embedding's update is rounded to the weight's dtype first, then added.
Updates are computed over fixed 64-row chunks, so a row's value does not depend on how the engine
cuts the tensor into blocks.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import ModelError
from .sources import TensorHeader, TensorReader, read_safetensors_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
_PREFIX = "base_model.model."  # PEFT's names: base_model.model.<module>.lora_A.weight
_LINEAR = re.compile(r"(.+)\.lora_([AB])\.weight")
_EMBEDDING = re.compile(r"(.+)\.lora_embedding_([AB])")
_CHUNK = 64


@dataclass(frozen=True)
class LoraUpdate:
    """The low-rank update of one weight: adapter tensors A and B, the scale, and its orientation."""

    a: str
    b: str
    rank: int
    scale: float
    transposed: bool  # W is (B @ A)^T shaped: an embedding, or a Conv1D (fan_in_fan_out)
    embedding: bool = False  # PEFT rounds an embedding's update to the weight's dtype before adding it


@dataclass(frozen=True)
class Adapter:
    """What an adapter does to its model's tensors, by the model's tensor names."""

    name: str
    updates: Mapping[str, LoraUpdate]
    replaced: Mapping[str, str]  # model tensor -> the adapter tensor that replaces it (modules_to_save)
    headers: Mapping[str, TensorHeader]


def _positive_int(config: Mapping[str, Any], key: str, where: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or value != int(value):
        raise ModelError(f"{where}: {ADAPTER_CONFIG} has {key} = {value!r}; a LoRA adapter needs a positive integer")
    return int(value)


def _pattern_value(patterns: Any, module: str, default: float) -> float:
    """PEFT's per-module override: the first key that matches the end of the module's name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(config: Mapping[str, Any], headers: Mapping[str, TensorHeader], where: str) -> Adapter:
    """The adapter described by its adapter_config.json and its weights' header; ModelError (one line)
    for what cannot be applied."""
    kind = str(config.get("peft_type") or "LORA").upper()
    if kind != "LORA":
        raise ModelError(f"{where} is a {kind} adapter; only LoRA adapters can be applied to a model (model+lora)")
    for key, what in (("use_dora", "a DoRA adapter"), ("lora_bias", "an adapter with LoRA biases")):
        if config.get(key):
            raise ModelError(f"{where} is {what} ({key}: true), which cannot be applied here; merge it into its "
                             "model with PEFT's merge_and_unload and name that model instead")
    if config.get("trainable_token_indices"):
        raise ModelError(f"{where} trains single tokens (trainable_token_indices), which cannot be applied here; "
                         "merge it into its model with PEFT's merge_and_unload and name that model instead")
    rank = _positive_int(config, "r", where)
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ModelError(f"{where}: {ADAPTER_CONFIG} has lora_alpha = {alpha!r}; it must be a number")
    rslora = bool(config.get("use_rslora"))
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    parts: dict[tuple[str, bool], dict[str, str]] = {}
    replaced: dict[str, str] = {}
    for name in headers:
        if not name.startswith(_PREFIX):
            raise ModelError(f"{where}: tensor {name} is not named as PEFT names adapter weights "
                             f"('{_PREFIX}...'); is this a PEFT LoRA adapter?")
        rest = name[len(_PREFIX):]
        if m := _LINEAR.fullmatch(rest):
            parts.setdefault((m.group(1), False), {})[m.group(2)] = name
        elif m := _EMBEDDING.fullmatch(rest):
            parts.setdefault((m.group(1), True), {})[m.group(2)] = name
        elif ".lora_" in rest:
            raise ModelError(f"{where}: adapter tensor {name} is of a kind that cannot be applied here "
                             "(plain LoRA A/B matrices and modules_to_save only)")
        else:  # a module_to_save, or the saved original of an adapted embedding (`X.base_layer.weight`)
            replaced[rest.replace(".base_layer.", ".")] = name
    updates = {}
    for (module, embedding), ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ModelError(f"{where}: {module} has lora_{'A' if 'A' in ab else 'B'} but not its partner")
        r = int(_pattern_value(config.get("rank_pattern"), module, rank))
        a = float(_pattern_value(config.get("alpha_pattern"), module, alpha))
        scale = a / math.sqrt(r) if rslora else a / r
        updates[f"{module}.weight"] = LoraUpdate(ab["A"], ab["B"], r, scale, embedding or fan_in_fan_out, embedding)
    if not updates and not replaced:
        raise ModelError(f"{where}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    return Adapter(where, updates, replaced, dict(headers))


def adapter_problems(adapter: Adapter, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Why the adapter does not fit a model with these tensor shapes (by stored name); empty if it does."""
    problems = []
    for name, u in adapter.updates.items():
        if name not in shapes:
            problems.append(f"{adapter.name} changes {name}, which the model does not have; "
                            "the adapter was trained on another model")
            continue
        a, b = adapter.headers[u.a].shape, adapter.headers[u.b].shape
        rows, cols = (b[0], a[1]) if len(a) == 2 and len(b) == 2 else (None, None)
        want = (cols, rows) if u.transposed else (rows, cols)
        if len(a) != 2 or len(b) != 2 or a[0] != u.rank or b[1] != u.rank or tuple(shapes[name]) != want:
            problems.append(f"{adapter.name}: its update of {name} (A {list(a)}, B {list(b)}, rank {u.rank}) does "
                            f"not fit the model's {list(shapes[name])}; the adapter was trained on another model")
    for name, source in adapter.replaced.items():
        if name not in shapes:
            problems.append(f"{adapter.name} replaces {name}, which the model does not have")
        elif tuple(adapter.headers[source].shape) != tuple(shapes[name]):
            problems.append(f"{adapter.name} replaces {name} ({list(shapes[name])}) with a tensor of shape "
                            f"{list(adapter.headers[source].shape)} (a resized vocabulary?); this cannot be applied")
    return problems


def stored_shapes(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shapes by stored name from a ModelInfo's tensors (TensorRefs); parts of fused tensors are left out."""
    return {ref.source_name: tuple(ref.shape) for ref in tensors.values() if ref.rows is None}


def load_local_adapter(folder: str | Path, where: str) -> Adapter:
    """An adapter folder's config and header (no tensor data)."""
    folder = Path(folder)
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise ModelError(f"{where} has no {missing[0]}; a LoRA adapter is a folder (or Hub repo) with "
                         f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, as PEFT saves it")
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(f"{where}: {ADAPTER_CONFIG} is not valid JSON") from None
    if not isinstance(config, dict):
        raise ModelError(f"{where}: {ADAPTER_CONFIG} is not a JSON object")
    headers = {name: h for name, h in read_safetensors_header(folder / ADAPTER_WEIGHTS).items()}
    return read_adapter(config, headers, where)


class AdaptedReader:
    """A model's tensor reader with an adapter applied to what it returns (see the module docstring)."""

    def __init__(self, base: Any, folder: str | Path, adapter: Adapter) -> None:
        self.base = base
        self.adapter = adapter
        self._weights = TensorReader(folder, {n: h for n, h in adapter.headers.items()})
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._chunk: tuple[str, int, torch.Tensor] | None = None

    @property
    def headers(self) -> Any:
        return self.base.headers

    def read(self, name: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        replacement = self.adapter.replaced.get(name)
        update = self.adapter.updates.get(name)
        weight = self.base.read(name, rows, out)
        if replacement is not None:
            weight.copy_(self._weights.read(replacement, rows).to(weight.dtype))
        if update is None:
            return weight
        start, stop = rows if rows is not None else (0, weight.shape[0])
        delta = self._delta(name, update, start, stop)
        if update.embedding:
            return weight.add_(delta.to(weight.dtype))
        return weight.copy_((weight.float() + delta).to(weight.dtype))

    def _delta(self, name: str, u: LoraUpdate, start: int, stop: int) -> torch.Tensor:
        """s * (B @ A) (or its transpose) at rows [start, stop), from whole 64-row chunks."""
        if name not in self._factors:
            self._factors[name] = (self._weights.read(u.a).float(), self._weights.read(u.b).float())
        a, b = self._factors[name]
        total = a.shape[1] if u.transposed else b.shape[0]
        pieces = []
        for c0 in range(start // _CHUNK * _CHUNK, stop, _CHUNK):
            if self._chunk is None or self._chunk[:2] != (name, c0):
                c1 = min(c0 + _CHUNK, total)
                chunk = (a[:, c0:c1].T @ b.T if u.transposed else b[c0:c1] @ a) * u.scale
                self._chunk = (name, c0, chunk)
            chunk = self._chunk[2]
            pieces.append(chunk[max(start - c0, 0):min(stop - c0, chunk.shape[0])])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def close(self) -> None:
        self._weights.close()
        self.base.close()


__all__ = ["ADAPTER_CONFIG", "ADAPTER_FILES", "ADAPTER_WEIGHTS", "Adapter", "AdaptedReader", "LoraUpdate",
           "adapter_problems", "load_local_adapter", "read_adapter", "stored_shapes"]
