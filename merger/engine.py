"""Plan the output tensors of a merge, then compute them one by one on a device and stream them out.

The plan is built from config and header metadata only: every output tensor's name, shape, dtype,
inputs and parameter scopes are known before a byte of weights is read. Running it reads each input
tensor once (prefetching the next while the current one merges) and hands each result to the sinks
(the safetensors writer, optionally a GGUF writer) as soon as it is computed.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from . import architecture as arch
from .errors import CancelledError, ModelError, RecipeError
from .methods import MergeInputs, Method, get_method
from .recipe import InputModel, ModelRef, Recipe, Slice, resolve_parameter
from .sources import DTYPE_BYTES, FLOAT_DTYPES, TORCH_DTYPES

RECIPE_TO_SAFETENSORS = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


@dataclass(frozen=True)
class Progress:
    """A progress report: tensors and bytes done out of the planned totals."""

    stage: str
    done: int
    total: int
    bytes_done: int
    bytes_total: int
    message: str = ""


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class SourceTensor:
    model: ModelRef
    ref: arch.TensorRef


@dataclass(frozen=True)
class VocabMap:
    """Row gather for a vocab-sized tensor: out row r <- input row index[r]; where an input lacks the
    token (-1), the mean of the rows of the inputs marked in donors[:, r] (mergekit's rule: the one
    model that has it, else the base, else all that have it; none: zeros)."""

    index: tuple[torch.Tensor, ...]
    donors: torch.Tensor  # bool [inputs, rows]
    pad: int = 0  # rows appended past the vocabulary (pad_to_multiple_of): each input's mean row


@dataclass(frozen=True)
class PlannedOutput:
    name: str
    shape: tuple[int, ...]
    dtype: str
    sources: tuple[SourceTensor, ...]
    base_index: int | None
    t: float
    input_params: tuple[Mapping[str, Any] | None, ...]  # per source: its own parameters (highest precedence)
    slice_params: Mapping[str, Any] | None
    merge: bool  # False: copy the single source / the reference model's tensor
    rows: int | None = None  # crop of dim 0 (common top-left block of differing vocabularies)
    vocab: VocabMap | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


@dataclass
class MergePlan:
    recipe: Recipe
    method: Method
    outputs: list[PlannedOutput]
    reference: ModelRef  # whose config, tokenizer and generation config the output starts from
    num_layers: int
    vocab_size: int | None
    out_dtype: str
    tie_word_embeddings: bool | None
    layer_sources: list[int] = field(default_factory=list)  # each output layer's source layer index
    warnings: list[str] = field(default_factory=list)

    @functools.cached_property
    def total_bytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)


# ---------------------------------------------------------------- planning

def _group_inputs(recipe: Recipe, infos: Mapping[ModelRef, arch.ModelInfo]) -> list[tuple[Slice, ModelRef | None]]:
    """Normalise `models:` to one slice over every layer (base appended when not listed), like mergekit."""
    if recipe.slices is not None:
        return [(s, s.base_model or recipe.base_model) for s in recipe.slices]
    sources = list(recipe.models)
    if recipe.base_model and all(m.model != recipe.base_model for m in sources):
        sources.append(InputModel(recipe.base_model))
    counts = {infos[m.model].num_layers for m in sources}
    if len(counts) > 1:
        detail = ", ".join(f"{m.model.display_name}: {infos[m.model].num_layers}" for m in sources)
        raise ModelError(f"the models have different layer counts ({detail}); use 'slices:' with "
                         "layer_range to choose which layers to merge")
    n = counts.pop()
    return [(Slice(tuple(InputModel(m.model, m.params, (0, n)) for m in sources)), recipe.base_model)]


def _is_pre_layer(name: str) -> bool:
    """Non-layer tensors before the first block (embeddings) vs after the last (final norm, head)."""
    return any(key in name for key in ("embed", "wte", "wpe", "embd", "word_embeddings"))


def _head_fallback(info: arch.ModelInfo, name: str) -> arch.TensorRef | None:
    """A tied model has no head tensor: its input embedding plays that role."""
    if name in info.tensors:
        return info.tensors[name]
    if info.tie_word_embeddings and arch.is_embedding(info, name):
        for other, ref in info.tensors.items():
            if other != name and arch.is_embedding(info, other):
                return ref
    return None


def plan_merge(recipe: Recipe, infos: Mapping[ModelRef, arch.ModelInfo], *,
               vocabs: Mapping[ModelRef, Mapping[str, int]] | None = None,
               union_vocab: Mapping[str, int] | None = None) -> MergePlan:
    """Every output tensor with its inputs and parameter scopes, from metadata alone.

    `vocabs` (token -> id per model) align embeddings to the tokenizer source's vocabulary, or to
    `union_vocab` for `tokenizer_source: union` (merger.tokenizer.build_union).
    """
    method = get_method(recipe.method)
    groups = _group_inputs(recipe, infos)
    first_slice, first_base = groups[0]
    reference = first_base or first_slice.sources[0].model
    ref_info = infos[reference]
    warnings: list[str] = []
    out_dtype = RECIPE_TO_SAFETENSORS.get(recipe.output_dtype or "", "") or _native_dtype(ref_info)

    for s, base in groups:
        for src in s.sources:
            n = infos[src.model].num_layers
            if src.layer_range and src.layer_range[1] > n:
                raise RecipeError(f"layer_range {list(src.layer_range)} of {src.model.display_name} is out of "
                                  f"bounds: it has {n} layers (0 to {n - 1}); use an end of at most {n}")
        if method.max_models == 1 and len(s.sources) > 1:
            raise RecipeError(f"{method.name} takes one source per slice; split the slice")

    outputs: list[PlannedOutput] = []
    non_layer_names = {n for info in infos.values() for n in info.tensors if arch.layer_index(n) is None}
    pre = [n for n in sorted(non_layer_names) if _is_pre_layer(n)]
    post = [n for n in sorted(non_layer_names) if not _is_pre_layer(n)]

    def add(name: str, out_name: str, s: Slice, base: ModelRef | None, t: float, layer: int | None) -> None:
        refs = [_head_fallback(infos[src.model], name if layer is None
                               else arch.rename_layer(name, src.layer_range[0] + layer)) for src in s.sources]
        if all(ref is None for ref in refs):
            return
        if None in refs:
            lacking = s.sources[refs.index(None)].model.display_name
            having = next(src for src, ref in zip(s.sources, refs) if ref is not None).model.display_name
            raise ModelError(f"tensor {name} is missing in {lacking} but present in {having}; these models "
                             "cannot be merged tensor by tensor")
        sources = [SourceTensor(src.model, ref) for src, ref in zip(s.sources, refs)]
        params = [src.params for src in s.sources]
        shapes = {x.ref.shape for x in sources}
        embedding = any(arch.is_embedding(infos[x.model], name) for x in sources)
        rows = vocab = None
        shape = sources[0].ref.shape
        if len(shapes) > 1:
            if not embedding or len({sh[1:] for sh in shapes}) > 1:
                detail = ", ".join(f"{x.model.display_name} {list(x.ref.shape)}" for x in sources)
                raise ModelError(f"tensor {name} has different shapes ({detail}); these models have "
                                 "different architectures or sizes and cannot be merged")
        if embedding and (len(shapes) > 1 or vocabs):
            shape, rows, vocab = _vocab_plan(recipe, name, sources, base, reference, infos, vocabs, warnings,
                                             union_vocab)
        base_index = next((i for i, x in enumerate(sources) if x.model == base), None) if base else None
        stored = sources[0].ref.dtype
        dtype = out_dtype if stored in FLOAT_DTYPES else stored
        merge = stored in FLOAT_DTYPES and not (method.name == "passthrough" and len(sources) == 1
                                                             and not _has_scale(s, recipe))
        outputs.append(PlannedOutput(out_name, tuple(shape), dtype, tuple(sources), base_index, t,
                                     tuple(params), s.params, merge, rows, vocab))

    for name in pre:
        add(name, name, first_slice, first_base, 0.0, None)
    out_layer = 0
    layer_sources: list[int] = []
    for s, base in groups:
        first = s.sources[0]
        n = first.layer_range[1] - first.layer_range[0]
        for offset in range(n):
            t = offset / (n - 1) if n > 1 else 1.0
            src_layer = first.layer_range[0] + offset
            names = sorted(nm for nm in infos[first.model].tensors if arch.layer_index(nm) == src_layer)
            for nm in names:
                canonical = arch.rename_layer(nm, 0)
                add(canonical, arch.rename_layer(nm, out_layer), s, base, t, offset)
            layer_sources.append(src_layer)
            out_layer += 1
    last_slice, last_base = groups[-1]
    for name in post:
        add(name, name, last_slice, last_base, 0.0, None)

    vocab_size = next((o.shape[0] for o in outputs if o.name in ref_info.tensors
                       and arch.is_embedding(ref_info, o.name)), ref_info.vocab_size)
    tie = ref_info.tie_word_embeddings
    head_names = [o.name for o in outputs if arch.is_embedding(ref_info, o.name)]
    if tie and len(head_names) > 1:
        tie = False  # some input had its own head: keep it, untied
    return MergePlan(recipe, method, outputs, reference, out_layer, vocab_size, out_dtype, tie, layer_sources,
                     warnings)


def output_parameters(method: Method, recipe: Recipe, out: PlannedOutput) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The shared values and each input's values for one output tensor, by mergekit's precedence
    (the input's own, the slice's, the top level's, the default). RecipeError names a required
    parameter that no scope gives a value for this tensor (e.g. only under filters it does not match).
    """
    shared = {p.name: resolve_parameter(p, (out.slice_params, recipe.params), out.name, out.t)
              for p in method.params if not p.per_model}
    per_model = []
    for j, src in enumerate(out.sources):
        own = [out.input_params[k] for k, s in enumerate(out.sources) if s.model == src.model]
        per_model.append({p.name: resolve_parameter(p, (*own, out.slice_params, recipe.params),
                                                    src.ref.source_name, out.t)
                          for p in method.params if p.per_model and not (p.non_base and j == out.base_index)})
    return shared, per_model


def _has_scale(s: Slice, recipe: Recipe) -> bool:
    return any("scale" in (src.params or {}) for src in s.sources) or "scale" in (s.params or {}) \
        or "scale" in (recipe.params or {})


def _native_dtype(info: arch.ModelInfo) -> str:
    for ref in info.tensors.values():
        if ref.dtype in FLOAT_DTYPES:
            return ref.dtype
    return "F32"


def _vocab_plan(recipe: Recipe, name: str, sources: list[SourceTensor], base: ModelRef | None,
                reference: ModelRef, infos: Mapping[ModelRef, arch.ModelInfo],
                vocabs: Mapping[ModelRef, Mapping[str, int]] | None,
                warnings: list[str], union_vocab: Mapping[str, int] | None = None,
                ) -> tuple[tuple[int, ...], int | None, VocabMap | None]:
    """Embedding rows when vocabularies differ: a common top-left block, or a tokenizer's vocabulary."""
    shapes = [x.ref.shape for x in sources]
    source = recipe.tokenizer_source
    if source is None:
        rows = min(sh[0] for sh in shapes)
        if len({sh[0] for sh in shapes}) > 1:
            msg = (f"vocab sizes differ ({', '.join(str(sh[0]) for sh in shapes)}): {name} keeps the first {rows} "
                   "rows, common to all models; set tokenizer_source to choose a tokenizer instead")
            if msg not in warnings:
                warnings.append(msg)
        return (rows, *shapes[0][1:]), rows, None
    src_model = (base or reference) if source in ("base", "union") else source
    if vocabs is None or src_model not in vocabs:
        raise ModelError(f"tokenizer_source {source} needs a tokenizer.json in {src_model}; it has none")
    if all(x.model != src_model for x in sources) and source != "union":
        raise ModelError(f"tokenizer_source {source} must be one of the merged models")
    if source == "union" and union_vocab is None:
        raise ModelError("tokenizer_source: union needs the union vocabulary (merger.tokenizer.build_union)")
    out_vocab = dict(union_vocab) if source == "union" else _usable_vocab(vocabs[src_model], infos[src_model])
    out_rows = len(out_vocab)  # as mergekit: one row per token, padding rows past the tokenizer dropped
    if any(i >= out_rows for i in out_vocab.values()):
        raise ModelError(f"the tokenizer of {src_model} has gaps in its token ids; it cannot define the "
                         "output vocabulary")
    tokens = sorted(out_vocab, key=out_vocab.get)
    index = []
    for x in sources:
        vocab = _usable_vocab(vocabs.get(x.model) or vocabs[src_model], infos[x.model])
        rows = x.ref.shape[0]
        index.append(torch.tensor([i if 0 <= (i := vocab.get(tok, -1)) < rows else -1 for tok in tokens],
                                  dtype=torch.long))
    present = torch.stack(index) >= 0
    donors = present.clone()
    base_at = next((k for k, x in enumerate(sources) if x.model == base), None)
    if base_at is not None:  # a token the base has and another model lacks takes the base's row
        shared = (present.sum(0) > 1) & present[base_at]
        donors[:, shared] = False
        donors[base_at, shared] = True
    multiple = recipe.pad_to_multiple_of
    pad = (-out_rows) % multiple if multiple else 0
    return (out_rows + pad, *sources[0].ref.shape[1:]), None, VocabMap(tuple(index), donors, pad)


def _usable_vocab(vocab: Mapping[str, int], info: arch.ModelInfo) -> dict[str, int]:
    """The tokens of a tokenizer that have a row in the model (mergekit strips ids >= vocab_size)."""
    limit = info.vocab_size if info.vocab_size is not None else len(vocab)
    return {tok: i for tok, i in vocab.items() if i < limit}


# ---------------------------------------------------------------- running

def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ModelError(f"unknown device '{device}'; use auto, cpu or cuda")
    return torch.device(device)


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from the run's seed and the output tensor's name: order and device independent."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


Reader = Any  # merger.sources.TensorReader or BinReader


class MergeRunner:
    """Runs a plan: reads inputs (prefetching the next tensor), merges on the device, feeds the sinks."""

    def __init__(self, plan: MergePlan, readers: Mapping[ModelRef, Reader], *, device: str = "auto",
                 seed: int = 0, progress: ProgressCallback | None = None,
                 cancel: Callable[[], bool] | threading.Event | None = None) -> None:
        self.plan = plan
        self.readers = readers
        self.device = resolve_device(device)
        self.seed = seed
        self.progress = progress
        self._cancel = cancel
        self.compute_dtype = TORCH_DTYPES[RECIPE_TO_SAFETENSORS[plan.recipe.dtype]] if plan.recipe.dtype else None
        self._inputs: list[torch.Tensor] = []
        self._kernel_buffers: dict[str, torch.Tensor] = {}
        self._raw: list[torch.Tensor] = []  # read buffers, one per input, refilled once a tensor is staged
        self._outputs = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]

    def cancelled(self) -> bool:
        c = self._cancel
        if c is None:
            return False
        return c.is_set() if isinstance(c, threading.Event) else bool(c())

    def _read(self, out: PlannedOutput) -> list[torch.Tensor]:
        """The raw inputs of `out`, read into reused buffers (free again once the last one was staged)."""
        tensors: list[torch.Tensor] = []
        for j, s in enumerate(out.sources):
            while len(self._raw) <= j:
                self._raw.append(torch.empty(0, dtype=torch.uint8))
            nbytes = math.prod(s.ref.shape) * DTYPE_BYTES[s.ref.dtype]
            if self._raw[j].numel() < nbytes:
                self._raw[j] = torch.empty(nbytes, dtype=torch.uint8)
            tensors.append(self.readers[s.model].read(s.ref.source_name, s.ref.rows, out=self._raw[j]))
        return tensors

    def run(self, sinks: Sequence[Callable[[str, torch.Tensor], None]]) -> None:
        """Merge every planned tensor: the next tensor is read while this one merges and the previous
        one is written (one set of read buffers, two output buffers)."""
        outputs = self.plan.outputs
        done_bytes = 0
        self._report("merge", 0, done_bytes, f"merging {len(outputs)} tensors on {self.device.type}")
        with ThreadPoolExecutor(1, thread_name_prefix="read") as reads, \
                ThreadPoolExecutor(1, thread_name_prefix="write") as writes:
            pending: list[Future] = [reads.submit(self._read, outputs[0])] if outputs else []
            written: Future | None = None
            for i, out in enumerate(outputs):
                if self.cancelled():
                    raise CancelledError("the merge was cancelled")
                raw = pending.pop().result()

                def read_next(i: int = i) -> None:  # the read buffers are free once tensor i is staged
                    if i + 1 < len(outputs):
                        pending.append(reads.submit(self._read, outputs[i + 1]))

                result = self.compute(out, raw, slot=i % 2, on_staged=read_next)
                if written is not None:
                    written.result()
                written = writes.submit(self._emit, sinks, out.name, result)
                done_bytes += out.nbytes
                self._report("merge", i + 1, done_bytes, out.name)
            if written is not None:
                written.result()

    @staticmethod
    def _emit(sinks: Sequence[Callable[[str, torch.Tensor], None]], name: str, tensor: torch.Tensor) -> None:
        for sink in sinks:
            sink(name, tensor)

    def _report(self, stage: str, done: int, bytes_done: int, message: str) -> None:
        if self.progress:
            self.progress(Progress(stage, done, len(self.plan.outputs), bytes_done, self.plan.total_bytes, message))

    def compute(self, out: PlannedOutput, raw: list[torch.Tensor], slot: int = 0,
                on_staged: Callable[[], None] | None = None) -> torch.Tensor:
        """One output tensor from its raw inputs (already read), in the output dtype, on the CPU.

        Inputs are converted into reused fp32 workspaces and results cast into a ring of two reused
        output buffers (one being written while the next is computed): fresh multi-hundred-MB
        allocations cost more in page faults than the arithmetic itself.
        """
        out_dtype = TORCH_DTYPES[out.dtype]
        if not out.merge:
            first = raw[0]
            if out.rows is not None:
                first = first[: out.rows]
            _check_finite(out.name, first, out_dtype)
            result = self._output(first, out_dtype, slot)
            if on_staged:
                on_staged()
            return result
        tensors = []
        for i, x in enumerate(raw):
            raw[i] = None  # drop the stored-dtype copy as soon as its fp32 copy exists
            if self.compute_dtype is not None and x.dtype != self.compute_dtype:
                x = x.to(self.compute_dtype)  # mergekit loads inputs in `dtype`, then computes in fp32
            if out.rows is not None:
                x = x[: out.rows]
            tensors.append(self._workspace(i, x.shape).copy_(x, non_blocking=True))
        if on_staged:
            on_staged()
        if out.vocab is not None:
            tensors = _gather_vocab(tensors, out.vocab)
        result = self._merge(out, tensors)
        del tensors
        _check_finite(out.name, result, out_dtype)
        return self._output(result, out_dtype, slot)

    def _workspace(self, index: int, shape: torch.Size) -> torch.Tensor:
        """A reused fp32 buffer on the device for input `index`, viewed as `shape`."""
        n = math.prod(shape)
        while len(self._inputs) <= index:
            self._inputs.append(torch.empty(0, dtype=torch.float32, device=self.device))
        if self._inputs[index].numel() < n:
            self._inputs[index] = torch.empty(n, dtype=torch.float32, device=self.device)
        return self._inputs[index][:n].view(shape)

    def _output(self, tensor: torch.Tensor, dtype: torch.dtype, slot: int) -> torch.Tensor:
        """`tensor` cast to `dtype` into CPU output buffer `slot` (the writer may still hold the other)."""
        nbytes = tensor.numel() * torch.empty(0, dtype=dtype).element_size()
        if self._outputs[slot].numel() < nbytes:
            self._outputs[slot] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        view = self._outputs[slot][:nbytes].view(dtype).view(tensor.shape)
        return view.copy_(tensor)

    def _merge(self, out: PlannedOutput, tensors: list[torch.Tensor]) -> torch.Tensor:
        method = self.plan.method
        shared, per_model = output_parameters(method, self.plan.recipe, out)
        generator = None
        if method.randomized:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(tensor_seed(self.seed, out.name))
        return method.merge(MergeInputs(tensors=tensors, base_index=out.base_index, model_params=per_model,
                                        params=shared, name=out.name, generator=generator,
                                        workspace=self._scratch))

    def _scratch(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A kernel's reused buffer (result or scratch), kept per key; grown, never shrunk."""
        n = math.prod(shape)
        buffer = self._kernel_buffers.get(key)
        if buffer is None or buffer.numel() < n:
            buffer = self._kernel_buffers[key] = torch.empty(n, dtype=torch.float32, device=self.device)
        return buffer[:n].view(shape)


def _check_finite(name: str, tensor: torch.Tensor, out_dtype: torch.dtype) -> None:
    """Refuse to write NaN/Inf, whether copied from an input, made by the merge, or made by the cast.

    One cheap reduction (min and max propagate NaN) instead of an element-wise scan; values beyond
    the output dtype's range would become Inf in the cast, so they are refused too.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    low, high = (float(v) for v in torch.aminmax(tensor.reshape(-1)))
    limit = torch.finfo(out_dtype).max if out_dtype.is_floating_point else math.inf
    if not (math.isfinite(low) and math.isfinite(high) and -limit <= low and high <= limit):
        raise ModelError(f"the merge produced NaN or Inf values in {name}; check the inputs for NaN/Inf weights "
                         "and the recipe's parameters (values beyond the output dtype's range become Inf)")


def _gather_vocab(tensors: list[torch.Tensor], vocab: VocabMap) -> list[torch.Tensor]:
    """Each input's rows in the output vocabulary's order; rows of tokens it lacks take the mean of
    the donors' rows (summed in input order, then divided, as mergekit does)."""
    device = tensors[0].device
    index = [i.to(device) for i in vocab.index]
    out = [x[i.clamp(min=0)] for x, i in zip(tensors, index)]
    missing = [i < 0 for i in index]
    if any(bool(m.any()) for m in missing):
        _fill_missing(out, missing, vocab.donors.to(device))
    if vocab.pad:  # as mergekit (after https://nlp.stanford.edu/~johnhew/vocab-expansion.html)
        out = [torch.cat([rows, rows.mean(dim=0, keepdim=True).expand(vocab.pad, *rows.shape[1:])]) for rows in out]
    return out


def _fill_missing(out: list[torch.Tensor], missing: list[torch.Tensor], donors: torch.Tensor) -> None:
    """Rows of tokens an input lacks: the mean of the donors' rows, in place."""
    device = out[0].device
    needed = torch.stack(missing).any(0)
    donors = donors[:, needed]
    default = torch.zeros((int(needed.sum()), *out[0].shape[1:]), dtype=out[0].dtype, device=device)
    for k, rows in enumerate(out):
        take = donors[k].view(-1, *([1] * (rows.dim() - 1)))
        default += torch.where(take, rows[needed], 0)
    default /= donors.sum(0).clamp(min=1).view(-1, *([1] * (default.dim() - 1)))
    for rows, m in zip(out, missing):
        rows[m] = default[m[needed]]


__all__ = ["MergePlan", "MergeRunner", "PlannedOutput", "Progress", "plan_merge", "resolve_device",
           "tensor_seed"]
