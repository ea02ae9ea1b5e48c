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
from .budget import default_budget, element_cost
from .methods import Method, get_method
from .methods.blocks import Job, Layout, Span, slice_span
from .recipe import InputModel, ModelRef, Recipe, Slice, resolve_parameter
from .recipe_tokens import TokenSetting, resolve_row
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
    fill: torch.Tensor | None = None  # bool [inputs, rows]: rows replaced by the donors' mean (None: index < 0)
    lent: Mapping[tuple[int, int], tuple[int, int]] = field(default_factory=dict)  # (input, row) staged from
    # (another source, its row): a model_token row whose model keeps its own row for the token


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
    # union_vocab: the union, or another source's vocabulary with the new tokens of tokenizer.tokens
    out_vocab = dict(union_vocab) if union_vocab is not None else _usable_vocab(vocabs[src_model], infos[src_model])
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
    fill = ~present
    lent: dict[tuple[int, int], tuple[int, int]] = {}
    for token, setting in recipe.tokens:
        _token_setting(token, setting, out_vocab, sources, vocabs, index, present, donors, fill, lent, name,
                       warnings)
    multiple = recipe.pad_to_multiple_of
    pad = (-out_rows) % multiple if multiple else 0
    return (out_rows + pad, *sources[0].ref.shape[1:]), None, VocabMap(tuple(index), donors, pad, fill, lent)


def _token_setting(token: str, setting: TokenSetting, out_vocab: Mapping[str, int], sources: list[SourceTensor],
                   vocabs: Mapping[ModelRef, Mapping[str, int]], index: list[torch.Tensor], present: torch.Tensor,
                   donors: torch.Tensor, fill: torch.Tensor, lent: dict[tuple[int, int], tuple[int, int]], name: str,
                   warnings: list[str]) -> None:
    """One `tokenizer.tokens` entry, as mergekit 0.1.5's PermutedEmbeddings: the models that lack the token
    (with force: all of them) take its source's row; a token every model has is left alone unless forced."""
    r = out_vocab.get(token)
    if r is None:
        msg = f"tokenizer.tokens: '{token}' is not in the output vocabulary; its setting is ignored"
        if msg not in warnings:
            warnings.append(msg)
        return
    if not setting.force and bool(present[:, r].all()):
        return
    fill[:, r] = True if setting.force else ~present[:, r]
    donors[:, r] = False
    if setting.kind == "zero":
        return
    k = next((k for k, x in enumerate(sources) if x.model == setting.model), None)
    if k is None:
        raise ModelError(f"tokenizer.tokens['{token}'] takes its embedding from {setting.model}, which has no "
                         f"{name} in this merge")
    if setting.kind == "model":
        if not present[k, r]:
            raise ModelError(f"tokenizer.tokens['{token}']: {setting.model} has no token '{token}'; take it from "
                             "a model that has it, or use {kind: model_token, ...}")
    else:
        row = resolve_row(token, setting, vocabs.get(setting.model), sources[k].ref.shape[0], setting.model)
        if not fill[k, r] and int(index[k][r]) != row:  # k keeps its own row: one that lacks it carries k's
            ref = sources[k].ref
            carrier = next((j for j in range(len(sources)) if fill[j, r] and sources[j].ref.dtype == ref.dtype
                            and sources[j].ref.shape[1:] == ref.shape[1:]), None)
            if carrier is None:
                raise ModelError(f"tokenizer.tokens['{token}']: {setting.model} keeps its own row for '{token}' "
                                 "and its other row cannot be staged here (the models' dtypes differ); add force: true")
            lent[(carrier, r)] = (k, row)
            donors[carrier, r] = True
            return
        index[k][r] = row
    donors[k, r] = True


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


Reader = Any  # merger.sources.TensorReader or BinReader (anything with read(name, rows=, out=))
Sink = Callable[[str, torch.Tensor], None]


class MergeRunner:
    """Runs a plan block by block under a memory budget: reads the next block while this one merges
    (one set of reused read buffers), merges on the device, and streams each block to the sinks.

    Part sinks take each output block as it comes (rows in order, or pieces of one row): the
    safetensors writer. Whole sinks (the GGUF stream, which permutes and quantizes whole tensors) get
    each output tensor once complete, assembled on the host outside the budget.
    """

    def __init__(self, plan: MergePlan, readers: Mapping[ModelRef, Reader], *, device: str = "auto",
                 seed: int = 0, progress: ProgressCallback | None = None,
                 cancel: Callable[[], bool] | threading.Event | None = None, max_memory: int | None = None) -> None:
        self.plan = plan
        self.readers = readers
        self.device = resolve_device(device)
        self.cuda = self.device.type == "cuda"
        self.budget = max_memory if max_memory is not None else default_budget(self.device)
        if self.budget <= 0:
            raise ModelError("--max-memory must be positive, e.g. 2GB or 500MB")
        self.seed = seed
        self.progress = progress
        self._cancel = cancel
        self.compute_dtype = TORCH_DTYPES[RECIPE_TO_SAFETENSORS[plan.recipe.dtype]] if plan.recipe.dtype else None
        self.blocks = 0  # blocks merged or copied so far, every pass counted once
        self._raw: list[torch.Tensor] = []  # host read buffers, one per input, refilled once a block is staged
        self._staged: list[list[torch.Tensor]] = [[], []]  # staged inputs; two sets on a GPU
        self._kernel_buffers: dict[str, torch.Tensor] = {}
        self._outputs = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
        self._slot = 0
        self._whole = torch.empty(0, dtype=torch.uint8)
        self._spans: dict[int, list[Span]] = {}
        self._pending: tuple[tuple[int, int], Future] | None = None
        self._written: Future | None = None
        self._reads: ThreadPoolExecutor | None = None
        self._writes: ThreadPoolExecutor | None = None
        self._raw_in_use: Any = None  # on a GPU: the event after which the read buffers may be refilled
        self._released: Any = None  # on a GPU: the event after which the older staged set is free
        self._side = torch.cuda.Stream(self.device) if self.cuda else None

    def cancelled(self) -> bool:
        c = self._cancel
        if c is None:
            return False
        return c.is_set() if isinstance(c, threading.Event) else bool(c())

    def run(self, sinks: Sequence[Sink] = (), part_sinks: Sequence[Sink] = ()) -> None:
        """Merge every planned tensor into the sinks, in plan order."""
        outputs = self.plan.outputs
        done_bytes = 0
        self._report("merge", 0, done_bytes, f"merging {len(outputs)} tensors on {self.device.type}")
        with ThreadPoolExecutor(1, thread_name_prefix="read") as reads, \
                ThreadPoolExecutor(1, thread_name_prefix="write") as writes:
            self._reads, self._writes = reads, writes
            try:
                for i, out in enumerate(outputs):
                    if self.cancelled():
                        raise CancelledError("the merge was cancelled")
                    self.compute(i, sinks, part_sinks)
                    done_bytes += out.nbytes
                    self._report("merge", i + 1, done_bytes, out.name)
                if self._written is not None:
                    self._written.result()
            finally:
                self._pending = self._written = None
                self._reads = self._writes = None

    def _report(self, stage: str, done: int, bytes_done: int, message: str) -> None:
        if self.progress:
            self.progress(Progress(stage, done, len(self.plan.outputs), bytes_done, self.plan.total_bytes, message))

    # ---------------------------------------------------------------- one output tensor

    def spans(self, index: int) -> list[Span]:
        """The blocks output `index` is cut into under the budget."""
        if index not in self._spans:
            out = self.plan.outputs[index]
            method = self.plan.method if out.merge else None
            stored = [DTYPE_BYTES[s.ref.dtype] for s in (out.sources if out.merge else out.sources[:1])]
            cost = element_cost(method, stored, DTYPE_BYTES[out.dtype], self.cuda)
            elements = cost.block_elements(self.budget, self.cuda)
            if out.vocab is not None and out.vocab.pad:
                elements = None  # padding rows are each input's mean row over the whole vocabulary
            self._spans[index] = Layout(out.shape).spans(elements, method is not None and method.whole_rows)
        return self._spans[index]

    def compute(self, index: int, sinks: Sequence[Sink] = (), part_sinks: Sequence[Sink] = ()) -> None:
        """Output tensor `index`, block by block, into the sinks, in the output dtype."""
        out = self.plan.outputs[index]
        spans = self.spans(index)
        layout = Layout(out.shape)
        out_dtype = TORCH_DTYPES[out.dtype]

        def load(i: int, final: bool) -> list[torch.Tensor]:
            if self.cancelled():
                raise CancelledError("the merge was cancelled")
            tensors = self._stage(index, i, set_index=i % 2 if self.cuda and len(spans) > 1 else 0)
            if len(spans) == 1 or (final and i + 1 == len(spans)):
                following = (index + 1, 0) if index + 1 < len(self.plan.outputs) else None
            else:
                following = (index, (i + 1) % len(spans))  # another block, or the first of the next pass
            if following is not None:
                self._submit_read(following)
            return tensors

        def emit(span: Span, values: torch.Tensor) -> None:
            self.blocks += 1
            _check_finite(out.name, values, out_dtype)
            host = self._host_output(values, out_dtype)
            event = torch.cuda.current_stream(self.device).record_event() if values.device.type == "cuda" else None
            if self._written is not None:
                self._written.result()
            whole = None
            if sinks:
                if len(spans) == 1:
                    whole = host
                else:
                    if event is not None:
                        event.synchronize()  # the block's device-to-host copy has landed
                    buffer = self._whole_buffer(out, out_dtype)
                    slice_span(buffer, layout, span).copy_(host)
                    whole = buffer if span == spans[-1] else None
            self._written = self._writes.submit(self._emit, event, sinks if whole is not None else (), part_sinks,
                                                out.name, host, whole)

        job_kw = dict(device=self.device if out.merge else torch.device("cpu"), workspace=self._scratch)
        if not out.merge:
            job = Job(out.shape, 1, spans, load, emit, name=out.name, **job_kw)
            job.emit(lambda block: block.tensors[0])
            return
        method = self.plan.method
        shared, per_model = output_parameters(method, self.plan.recipe, out)
        generator = None
        if method.randomized:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(tensor_seed(self.seed, out.name))
        method.run(Job(out.shape, len(out.sources), spans, load, emit, base_index=out.base_index,
                       model_params=per_model, params=shared, name=out.name, generator=generator, **job_kw))

    @staticmethod
    def _emit(event: Any, sinks: Sequence[Sink], part_sinks: Sequence[Sink], name: str, part: torch.Tensor,
              whole: torch.Tensor | None) -> None:
        if event is not None:
            event.synchronize()  # the device-to-host copy of this block has landed
        for sink in part_sinks:
            sink(name, part)
        if whole is not None:
            for sink in sinks:
                sink(name, whole)

    # ---------------------------------------------------------------- reading and staging

    def _submit_read(self, key: tuple[int, int]) -> None:
        if self._reads is None or (self._pending is not None and self._pending[0] == key):
            return
        self._pending = (key, self._reads.submit(self._read, key, self._raw_in_use))

    def _read(self, key: tuple[int, int], wait: Any = None) -> list[torch.Tensor]:
        """The stored bytes of block key = (output, block) of every input, in the reused read buffers."""
        if wait is not None:
            wait.synchronize()  # the previous block's host-to-device copies have read the buffers
        index, i = key
        out = self.plan.outputs[index]
        span = self.spans(index)[i]
        sources = out.sources if out.merge else out.sources[:1]
        return [self._read_source(out, j, span) for j in range(len(sources))]

    def _read_source(self, out: PlannedOutput, j: int, span: Span) -> torch.Tensor:
        ref = out.sources[j].ref
        (r0, r1), (c0, c1) = span.rows, span.cols
        trailing, cut = tuple(ref.shape[1:]), None
        if len(out.shape) <= 1:  # a vector's "rows" in the file are its entries
            runs = [(j, c0, c1)]
        else:
            runs = _row_runs(out, j, r0, r1)
            cut = (c0, c1) if (c0, c1) != (0, math.prod(trailing)) else None
        row_bytes = math.prod(trailing) * DTYPE_BYTES[ref.dtype]
        nbytes = sum(stop - start for _, start, stop in runs) * row_bytes
        while len(self._raw) <= j:
            self._raw.append(torch.empty(0, dtype=torch.uint8))
        if self._raw[j].numel() < nbytes:
            self._raw[j] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)
        done = 0
        for k, start, stop in runs:
            src = out.sources[k]
            src_offset = src.ref.rows[0] if src.ref.rows else 0
            size = (stop - start) * row_bytes
            dest = self._raw[j][done:done + size]
            rows = (src_offset + start, src_offset + stop) if out.shape else src.ref.rows
            got = self.readers[src.model].read(src.ref.source_name, rows, out=dest)
            if got.data_ptr() != dest.data_ptr():  # a reader that ignores `out` (pickle checkpoints)
                dest.copy_(got.reshape(-1).view(torch.uint8))
            done += size
        dtype = TORCH_DTYPES[ref.dtype]
        if len(out.shape) <= 1:
            return self._raw[j][:nbytes].view(dtype).reshape(span.shape)
        rows = self._raw[j][:nbytes].view(dtype).reshape(-1, *trailing)
        return rows.reshape(1, -1)[:, cut[0]:cut[1]] if cut else rows

    def _stage(self, index: int, i: int, set_index: int) -> list[torch.Tensor]:
        """Block i of output `index` on the merging device: float32 (in `dtype` first when the recipe
        sets one), or the stored dtype on the host for a plain copy. On a GPU the copies run on a side
        stream into the older of two staged sets, so they overlap the merge of the previous block."""
        key = (index, i)
        pending, self._pending = self._pending, None
        raw = pending[1].result() if pending is not None and pending[0] == key else self._read(key, self._raw_in_use)
        out = self.plan.outputs[index]
        staged = []
        copy_to_device = self.cuda and out.merge
        if copy_to_device:
            compute = torch.cuda.current_stream(self.device)
            mark = compute.record_event()
            if self._released is not None:
                self._side.wait_event(self._released)  # the set written now was last read two blocks ago
            self._released = mark
        for j, x in enumerate(raw):
            if not out.merge:
                staged.append(self._staging(set_index, j, x.shape, x.dtype, torch.device("cpu")).copy_(x))
                continue
            if self.compute_dtype is not None and x.dtype != self.compute_dtype:
                x = x.to(self.compute_dtype)  # mergekit loads inputs in `dtype`, then computes in fp32
            target = self._staging(set_index, j, x.shape, torch.float32, self.device)
            if copy_to_device:
                with torch.cuda.stream(self._side):
                    target.copy_(x, non_blocking=True)
            else:
                target.copy_(x)
            staged.append(target)
        if copy_to_device:
            copied = self._side.record_event()
            torch.cuda.current_stream(self.device).wait_event(copied)
            self._raw_in_use = copied
        if out.vocab is not None:
            _complete_vocab(staged if out.merge else staged[:1], out.vocab, self.spans(index)[i].rows)
        return staged

    def _staging(self, set_index: int, j: int, shape: torch.Size, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        """A reused buffer for input j of a staged set, viewed as `shape` of `dtype`."""
        buffers = self._staged[set_index]
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        while len(buffers) <= j:
            buffers.append(torch.empty(0, dtype=torch.uint8))
        if buffers[j].numel() < nbytes or buffers[j].device != device:
            if buffers[j].is_cuda:
                self._side.synchronize()  # the side stream's copies into the old buffer are done before it is freed
            buffers[j] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return buffers[j][:nbytes].view(dtype).view(shape)

    # ---------------------------------------------------------------- outputs

    def _host_output(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`values` cast to `dtype` into the next host output buffer (the writer may hold the other)."""
        slot, self._slot = self._slot, self._slot ^ 1
        nbytes = values.numel() * torch.empty(0, dtype=dtype).element_size()
        if self._outputs[slot].numel() < nbytes:
            self._outputs[slot] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)
        view = self._outputs[slot][:nbytes].view(dtype).view(values.shape)
        if values.device.type == "cuda":
            return view.copy_(values.to(dtype), non_blocking=True)
        return view.copy_(values)

    def _whole_buffer(self, out: PlannedOutput, dtype: torch.dtype) -> torch.Tensor:
        if self._whole.numel() < out.nbytes:
            self._whole = torch.empty(out.nbytes, dtype=torch.uint8)
        return self._whole[:out.nbytes].view(dtype).view(out.shape)

    def _scratch(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A kernel's reused buffer (result or scratch), kept per key; grown, never shrunk."""
        n = math.prod(shape)
        buffer = self._kernel_buffers.get(key)
        if buffer is None or buffer.numel() < n:
            buffer = self._kernel_buffers[key] = torch.empty(n, dtype=torch.float32, device=self.device)
        return buffer[:n].view(shape)


def _row_runs(out: PlannedOutput, j: int, r0: int, r1: int) -> list[tuple[int, int, int]]:
    """Where input j's rows [r0, r1) of output `out` come from: runs (source position, first, stop) of
    consecutive stored rows. Without a vocabulary map that is one run of the input's own rows; with
    one, output row r is input row index[r], or the row another source lends it (vocab.lent). Rows of
    tokens the input lacks, and padding rows, are filled after staging (`_complete_vocab`): any stored
    row holds their place, the next one when it continues the run."""
    if out.vocab is None:
        return [(j, r0, r1)]
    index, lent = out.vocab.index[j], out.vocab.lent
    runs: list[tuple[int, int, int]] = []
    for r in range(r0, r1):
        source, row = lent.get((j, r)) or (j, int(index[r]) if r < len(index) else -1)
        if row < 0:  # a placeholder
            source, row = (runs[-1][0], runs[-1][2]) if runs and runs[-1][2] < out.sources[runs[-1][0]].ref.shape[0] \
                else (j, 0)
        if runs and runs[-1][0] == source and runs[-1][2] == row:
            runs[-1] = (source, runs[-1][1], row + 1)
        else:
            runs.append((source, row, row + 1))
    return runs


def _complete_vocab(tensors: list[torch.Tensor], vocab: VocabMap, rows: tuple[int, int]) -> None:
    """Fill, in place, the rows [rows) of each input's block that it has no token for: the mean of the
    donors' rows (summed in input order, then divided, as mergekit 0.1.5 does), and the padding rows
    past the vocabulary (pad_to_multiple_of): each input's mean row, as mergekit (after
    https://nlp.stanford.edu/~johnhew/vocab-expansion.html). Padding needs the whole tensor as one block."""
    r0, r1 = rows
    n_vocab = len(vocab.index[0])
    device = tensors[0].device
    stop = min(r1, n_vocab)
    if stop > r0:
        missing = [(vocab.fill[k, r0:stop] if vocab.fill is not None else i[r0:stop] < 0).to(device)
                   for k, i in enumerate(vocab.index[:len(tensors)])]
        if any(bool(m.any()) for m in missing):
            _fill_missing([t[:stop - r0] for t in tensors], missing, vocab.donors[:len(tensors), r0:stop].to(device))
    if r1 > n_vocab:
        assert r0 == 0, "padding rows are filled only when the whole tensor is one block"
        for t in tensors:
            t[n_vocab:r1] = t[:n_vocab].mean(dim=0, keepdim=True)


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
