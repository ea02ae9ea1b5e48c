"""A whole tensor, a block at a time: the passes a merge method makes and exact reductions over them.

A kernel sees a `Job`: one output tensor's inputs, reachable one block (a range of rows, or of columns
inside one row) at a time. It makes `sweep`s that feed reductions (sums, counts, selections) and ends
with one `emit` that produces the merged values block by block. Every reduction gives the same bits
however the tensor is cut: sums are pairwise trees over fixed granules of GRANULE entries inside each
row (a block always holds whole granules), counts and histograms are integers, selections are exact,
and random draws come in flat index order from one stream. The whole tensor as one block is just the
case of a single block, so a merge under any memory budget equals the unbudgeted one bit for bit.

The tensor is viewed as rows x columns: rows are dim 0 (a 0-D or 1-D tensor is one row), columns are
everything else. A block is whole rows, or, when one row does not fit and the tensor has at most two
dimensions, a granule-aligned column range of one row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

GRANULE = 1024  # entries per summation granule (a power of two)
_PIECE = 1 << 20  # entries converted to float64 at a time inside one reduction call
# granules summed per tree call: each step then stays under torch's grain for threading, and small
# element-wise steps run faster on one thread than split across busy cores
_TREE_GRANULES = 32


@dataclass(frozen=True)
class Span:
    """Where a block lies: dim-0 rows [rows), columns [cols) of the rows x columns view, its shape."""

    rows: tuple[int, int]
    cols: tuple[int, int]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Layout:
    """A tensor's shape seen as rows x columns, and its division into blocks of bounded size."""

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(shape)
        self.numel = math.prod(self.shape)
        if len(self.shape) <= 1:
            self.rows, self.cols = 1, (self.shape[0] if self.shape else 1)
        else:
            self.rows, self.cols = self.shape[0], math.prod(self.shape[1:])

    def span(self, r0: int, r1: int, c0: int = 0, c1: int | None = None) -> Span:
        c1 = self.cols if c1 is None else c1
        if c0 == 0 and c1 == self.cols:
            shape = self.shape if len(self.shape) <= 1 else (r1 - r0, *self.shape[1:])
        else:
            shape = (c1 - c0,) if len(self.shape) == 1 else (1, c1 - c0)
        return Span((r0, r1), (c0, c1), shape)

    def spans(self, max_elements: int | None, whole_rows: bool = False) -> list[Span]:
        """Blocks in flat order, each of at most `max_elements` entries where the shape allows it.

        A block is never smaller than one row when `whole_rows` is set or the tensor has more than two
        dimensions, and never smaller than one granule.
        """
        if max_elements is None or self.numel <= max_elements or self.numel == 0:
            return [self.span(0, self.rows)]
        if self.cols <= max_elements:
            step = max_elements // self.cols
            return [self.span(r, min(r + step, self.rows)) for r in range(0, self.rows, step)]
        if whole_rows or len(self.shape) > 2:
            return [self.span(r, r + 1) for r in range(self.rows)]
        step = max(GRANULE, max_elements // GRANULE * GRANULE)
        return [self.span(r, r + 1, c, min(c + step, self.cols))
                for r in range(self.rows) for c in range(0, self.cols, step)]


def slice_span(tensor: torch.Tensor, layout: Layout, span: Span) -> torch.Tensor:
    """The block of a whole tensor at `span` (a view)."""
    (r0, r1), (c0, c1) = span.rows, span.cols
    if len(layout.shape) <= 1:
        return tensor[c0:c1] if tensor.dim() else tensor
    if c0 == 0 and c1 == layout.cols:
        return tensor[r0:r1]
    return tensor[r0:r1].reshape(1, layout.cols)[:, c0:c1]


class Block:
    """One block of every input, float32, in the block's shape; kernels never modify the tensors."""

    def __init__(self, job: "Job", span: Span, tensors: list[torch.Tensor]) -> None:
        self.job = job
        self.span = span
        self.tensors = tensors
        self.shape = span.shape
        self.start = span.rows[0] * job.layout.cols + span.cols[0]  # flat index of the first entry
        self.first = self.start == 0  # the first block of a sweep
        self._draws: dict[int, torch.Tensor] = {}

    @property
    def numel(self) -> int:
        return self.span.numel

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row values (one per dim-0 row of the tensor) shaped to broadcast over this block."""
        part = values[self.span.rows[0]:self.span.rows[1]]
        return part.reshape(-1, *([1] * (len(self.shape) - 1))) if self.shape else part.reshape(())

    def per_column(self, values: torch.Tensor) -> torch.Tensor:
        """Per-column values (one per entry of a row) shaped to broadcast over this block."""
        part = values[self.span.cols[0]:self.span.cols[1]]
        if len(self.job.layout.shape) > 2:
            return part.reshape(self.shape[1:])
        return part

    def uniform(self, stream: int) -> torch.Tensor:
        """Uniform [0, 1) draws for this block's entries from random stream `stream` (see Job.uniform)."""
        if stream not in self._draws:
            self._draws[stream] = self.job._draw(stream, self)
        return self._draws[stream]

    def buffer(self, key: str, shape: Sequence[int] | None = None) -> torch.Tensor:
        return self.job.buffer(key, self.shape if shape is None else shape)


Loader = Callable[[int, bool], list[torch.Tensor]]  # (block index, in the emit pass) -> float32 input blocks
Emitter = Callable[[Span, torch.Tensor], None]


class Job:
    """One output tensor to merge: its inputs block by block, its parameters, where results go.

    The engine builds it over files (reading each block when a sweep reaches it); `Method.merge` builds
    it over tensors in memory. base_index, model_params and params are as in `MergeInputs`.
    """

    def __init__(self, shape: Sequence[int], n_inputs: int, spans: list[Span], load: Loader, emit: Emitter, *,
                 base_index: int | None = None, model_params: Sequence[dict] = (), params: dict | None = None,
                 name: str = "", generator: torch.Generator | None = None, device: torch.device | None = None,
                 workspace: Callable[[str, tuple[int, ...]], torch.Tensor] | None = None) -> None:
        self.layout = Layout(shape)
        self.shape = self.layout.shape
        self.numel = self.layout.numel
        self.n = n_inputs
        self.spans = spans
        self._load = load
        self._emit = emit
        self.base_index = base_index
        self.model_params = list(model_params) or [{} for _ in range(n_inputs)]
        self.params = dict(params or {})
        self.name = name
        self.generator = generator
        self.device = device or torch.device("cpu")
        self.workspace = workspace
        self.sweeps = 0
        self._resident: list[torch.Tensor] | None = None
        self._stream_states: list[torch.Tensor] = []
        self._live: dict[int, torch.Generator] = {}

    # ---------------------------------------------------------------- what kernels call

    @property
    def other_indices(self) -> list[int]:
        return [i for i in range(self.n) if i != self.base_index]

    def values(self, name: str, indices: Sequence[int]) -> list:
        return [self.model_params[i][name] for i in indices]

    def sweep(self, visit: Callable[[Block], None]) -> None:
        """Visit every block in flat order (a pass that feeds reductions)."""
        self.sweeps += 1
        for i, span in enumerate(self.spans):
            visit(Block(self, span, self._block(i, False)))

    def emit(self, produce: Callable[[Block], torch.Tensor]) -> None:
        """The last pass: `produce(block)` returns the merged float32 values of each block, in order."""
        self.sweeps += 1
        for i, span in enumerate(self.spans):
            values = produce(Block(self, span, self._block(i, True)))
            if tuple(values.shape) != span.shape:
                raise AssertionError(f"{self.name}: a block of shape {span.shape} produced {tuple(values.shape)}")
            self._emit(span, values)
        self._resident = None

    def buffer(self, key: str, shape: Sequence[int]) -> torch.Tensor:
        """An uninitialised float32 scratch or result tensor, reused per key when the engine allows."""
        if self.workspace is None:
            return torch.empty(tuple(shape), dtype=torch.float32, device=self.device)
        return self.workspace(key, tuple(shape))

    # ---------------------------------------------------------------- random streams

    def _draw(self, stream: int, block: Block) -> torch.Tensor:
        """Draws of stream `stream` for `block`: the generator's output is cut into consecutive segments
        of `numel` draws, segment s being stream s, so that drawing stream 0 for the whole tensor, then
        stream 1, ... gives the very same numbers as drawing them block by block."""
        if self.generator is None:
            raise ValueError(f"a randomized method needs a generator (tensor {self.name})")
        if not self._stream_states:
            self._stream_states.append(self.generator.get_state())
        while len(self._stream_states) <= stream:  # skip one segment of draws to find the next start
            skipper = self._generator_at(self._stream_states[-1])
            for start in range(0, self.numel, _PIECE):
                torch.rand(min(_PIECE, self.numel - start), generator=skipper, device=skipper.device)
            self._stream_states.append(skipper.get_state())
        if block.first or stream not in self._live:
            self._live[stream] = self._generator_at(self._stream_states[stream])
        live = self._live[stream]
        draws = torch.rand(block.shape, generator=live, device=live.device)
        if block.start + block.numel == self.numel and len(self._stream_states) == stream + 1:
            self._stream_states.append(live.get_state())  # the next stream starts here: no skipping needed
        return draws.to(self.device)

    def _generator_at(self, state: torch.Tensor) -> torch.Generator:
        assert self.generator is not None
        generator = torch.Generator(device=self.generator.device)
        generator.set_state(state)
        return generator

    # ---------------------------------------------------------------- blocks

    def _block(self, index: int, final: bool) -> list[torch.Tensor]:
        if len(self.spans) == 1:  # the whole tensor fits: read it once for every pass
            if self._resident is None:
                self._resident = self._load(0, final)
            return self._resident
        return self._load(index, final)


# ---------------------------------------------------------------- exact sums


def _tree(x: torch.Tensor) -> torch.Tensor:
    """Pairwise sum over the last axis (zero-padded to a power of two): fixed order, any device."""
    n = x.shape[-1]
    size = 1 << max(0, (n - 1).bit_length())
    if size != n:
        x = torch.cat([x, x.new_zeros((*x.shape[:-1], size - n))], dim=-1)
    else:
        x = x.clone()
    return _tree_(x)


def _tree_(x: torch.Tensor) -> torch.Tensor:
    """`_tree` in place on `x` (last axis a power of two), which it overwrites."""
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half].add_(x[..., half:])
    return x[..., 0]


def granule_sums(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 sums of x (or x * y) over granules of each row of the 2-D `x`: [rows, ceil(cols / GRANULE)].

    Rows are cut into GRANULE-wide granules from their first column; products of float32 values are
    exact in float64, and each granule is summed by the same pairwise tree (a partial last granule
    padded with zeros), so a granule's sum depends on its entries only.
    """
    rows, cols = x.shape
    granules = -(-cols // GRANULE)
    out = torch.empty((rows, granules), dtype=torch.float64, device=x.device)
    row_step = max(1, _PIECE // max(cols, 1))
    col_step = _PIECE if row_step == 1 else cols
    piece = torch.empty(min(rows, row_step) * min(granules, -(-col_step // GRANULE)) * GRANULE,
                        dtype=torch.float64, device=x.device)
    for r in range(0, rows, row_step):
        for c in range(0, cols, col_step):
            xs = x[r:r + row_step, c:c + col_step]
            height, width = xs.shape
            padded = -(-width // GRANULE) * GRANULE
            values = piece[:height * padded].view(height, padded)
            values[:, :width].copy_(xs)
            if padded > width:
                values[:, width:].zero_()
            if y is not None:
                values[:, :width].mul_(y[r:r + row_step, c:c + col_step])
            g0 = c // GRANULE
            grid = values.view(-1, GRANULE)
            sums = torch.empty(grid.shape[0], dtype=torch.float64, device=x.device)
            for i in range(0, grid.shape[0], _TREE_GRANULES):
                sums[i:i + _TREE_GRANULES] = _tree_(grid[i:i + _TREE_GRANULES])
            out[r:r + height, g0:g0 + padded // GRANULE] = sums.view(height, -1)
    return out


def vector_sums(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Exact-order float64 sums of x (or x * y) along the last axis, one per vector: shape x.shape[:-1]."""
    flat_x = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    flat_y = None if y is None else (y.reshape(-1, y.shape[-1]) if y.dim() else y.reshape(1, 1))
    return _tree(granule_sums(flat_x, flat_y)).reshape(x.shape[:-1] if x.dim() else ())


Per = Literal["total", "row", "column"]


class Sums:
    """`count` float64 sums of entries (or products of entries) over the whole tensor, per dim-0 row,
    or per column, equal bit for bit however the tensor is cut into blocks.

    total and per-row sums keep one partial sum per granule and add them up in a fixed tree at the end;
    per-column sums add the rows in order.
    """

    def __init__(self, job: Job, count: int, per: Per = "total") -> None:
        self.job = job
        self.per = per
        layout = job.layout
        self._granules = -(-layout.cols // GRANULE)
        if per == "column":
            self._parts = torch.zeros((count, layout.cols), dtype=torch.float64, device=job.device)
        else:
            self._parts = torch.zeros((count, layout.rows, self._granules), dtype=torch.float64, device=job.device)

    def add(self, block: Block, index: int, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Add the block's entries of x (or of x * y) to sum `index`."""
        (r0, r1), (c0, c1) = block.span.rows, block.span.cols
        x2 = x.reshape(r1 - r0, c1 - c0)
        y2 = None if y is None else y.reshape(r1 - r0, c1 - c0)
        if self.per == "column":
            target = self._parts[index, c0:c1]
            for r in range(r1 - r0):
                row = x2[r].double()
                target += row.mul_(y2[r]) if y2 is not None else row
            return
        sums = granule_sums(x2, y2)
        g0 = c0 // GRANULE
        self._parts[index, r0:r1, g0:g0 + sums.shape[1]] = sums

    def total(self, index: int) -> float:
        return float(_tree(self._parts[index].reshape(-1)))

    def totals(self) -> list[float]:
        return [self.total(i) for i in range(self._parts.shape[0])]

    def rows(self, index: int) -> torch.Tensor:
        """Per-row sums [rows] (float64)."""
        return _tree(self._parts[index])

    def columns(self, index: int) -> torch.Tensor:
        """Per-column sums [columns] (float64)."""
        return self._parts[index]


# ---------------------------------------------------------------- exact selection


_BINS = 1 << 16


def _bits(scores: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of non-negative float32 scores, sign cleared (-0.0 is 0.0): they order
    like the values."""
    return scores.reshape(-1).view(torch.int32) & 0x7FFFFFFF


class Cutoff:
    """The mask of the k smallest entries of a score tensor, ties at the threshold going to the lower
    flat index, applied block by block in flat order (the tie count restarts with every sweep)."""

    def __init__(self, k: int, n: int, threshold: float | None = None, below: int = 0) -> None:
        self.k, self.n, self.threshold, self.below = k, n, threshold, below
        self._ties_left = 0

    def mask(self, block: Block, scores: torch.Tensor) -> torch.Tensor:
        return self._select(block, scores, keep=False)

    def keep(self, block: Block, scores: torch.Tensor) -> torch.Tensor:
        """The complement of `mask` (the entries not among the k smallest), made in as many passes."""
        return self._select(block, scores, keep=True)

    def _select(self, block: Block, scores: torch.Tensor, keep: bool) -> torch.Tensor:
        if self.k <= 0 or self.k >= self.n:
            fill = (self.k <= 0) == keep
            return torch.full(scores.shape, fill, dtype=torch.bool, device=scores.device)
        if block.first:
            self._ties_left = self.k - self.below
        mask = scores >= self.threshold if keep else scores < self.threshold
        if self._ties_left > 0:
            ties = torch.nonzero((scores == self.threshold).reshape(-1)).squeeze(1)[: self._ties_left]
            mask.reshape(-1)[ties] = not keep
            self._ties_left -= ties.numel()
        return mask


class Selection:
    """Exact k-th smallest values of non-negative float32 scores seen block by block (several score
    streams at once): a histogram of the top 16 bits in one sweep, of the low 16 bits inside the
    chosen top bins in a second.

    Usage: sweep calling `count(...)`; `choose(ks)`; sweep calling `count(...)` again; `cutoffs()`.
    """

    def __init__(self, streams: int, n: int) -> None:
        self.n = n
        self._high = [torch.zeros(_BINS, dtype=torch.int64) for _ in range(streams)]
        self._targets: list[list[tuple[int, int, int]]] | None = None  # per stream: (k, top bin, below it)
        self._low: list[dict[int, torch.Tensor]] = [{} for _ in range(streams)]

    def count(self, stream: int, scores: torch.Tensor) -> None:
        bits = _bits(scores)
        if self._targets is None:
            self._high[stream] += torch.bincount(bits >> 16, minlength=_BINS).cpu()
            return
        for top in {t for _, t, _ in self._targets[stream]}:
            inside = bits[(bits >> 16) == top] & 0xFFFF
            counts = torch.bincount(inside, minlength=_BINS).cpu()
            low = self._low[stream]
            low[top] = low[top] + counts if top in low else counts

    def choose(self, ks: Sequence[Sequence[int]]) -> None:
        """Fix the wanted ranks (1-based k per stream) after the first sweep."""
        self._targets = []
        for stream, wanted in enumerate(ks):
            cumulative = self._high[stream].cumsum(0)
            targets = []
            for k in wanted:
                if 0 < k <= self.n:
                    top = int(torch.searchsorted(cumulative, k))
                    targets.append((k, top, int(cumulative[top - 1]) if top else 0))
            self._targets.append(targets)
            for _, top, _ in targets:
                self._low[stream].setdefault(top, torch.zeros(_BINS, dtype=torch.int64))

    def cutoffs(self, ks: Sequence[Sequence[int]]) -> list[list[Cutoff]]:
        """After the second sweep: per stream, per k, the Cutoff of the k smallest scores."""
        assert self._targets is not None
        out = []
        for stream, wanted in enumerate(ks):
            targets = {k: (top, below) for k, top, below in self._targets[stream]}
            row = []
            for k in wanted:
                if k not in targets:
                    row.append(Cutoff(k, self.n))
                    continue
                top, below = targets[k]
                cumulative = self._low[stream][top].cumsum(0)
                low = int(torch.searchsorted(cumulative, k - below))
                bits = torch.tensor([(top << 16) | low], dtype=torch.int32)
                threshold = float(bits.view(torch.float32))
                row.append(Cutoff(k, self.n, threshold, below + (int(cumulative[low - 1]) if low else 0)))
            out.append(row)
        return out


_SAMPLE = 65_536  # entries sampled to bracket the k-th value before an in-memory exact selection


def kth_in_memory(flat: torch.Tensor, k: int) -> tuple[float, int]:
    """The k-th smallest entry (1-based) of a 1-D tensor held whole, exactly, and how many entries are
    smaller than it.

    A full selection is single-threaded and slow on large tensors, so a fixed pseudo-random sample
    first brackets the answer; the exact selection then runs only on the entries inside the bracket,
    and the count below it comes from the bracket too (no further pass over the tensor). When the
    bracket misses (it cannot be wrong, only unlucky) the full selection runs.
    """
    n = flat.numel()
    if n > 16 * _SAMPLE:
        picks = torch.randint(n, (_SAMPLE,), generator=torch.Generator().manual_seed(n + k)).to(flat.device)
        sample = flat[picks]
        q = k / n
        margin = int(6 * (_SAMPLE * q * (1 - q)) ** 0.5) + 16
        centre = int(q * _SAMPLE)
        lo = torch.kthvalue(sample, max(1, centre - margin)).values
        hi = torch.kthvalue(sample, min(_SAMPLE, centre + margin)).values
        below = int(torch.count_nonzero(flat < lo))
        if below < k:
            band = flat[(flat >= lo) & (flat <= hi)]
            if below + band.numel() >= k:
                value = torch.kthvalue(band, k - below).values
                return float(value), below + int(torch.count_nonzero(band < value))
    value = torch.kthvalue(flat, k).values
    return float(value), int(torch.count_nonzero(flat < value))


def smallest_cutoffs(job: Job, streams: int, ks: Sequence[Sequence[int]] | Callable[[], Sequence[Sequence[int]]],
                     scores: Callable[[Block, int], torch.Tensor],
                     also: Callable[[Block], None] | None = None) -> list[list[Cutoff]]:
    """Cutoffs of the ks[s] smallest `scores(block, s)` for every stream s.

    `also(block)` runs in the first sweep too (another reduction sharing the pass); `ks` may be a
    function called after that sweep, when it depends on what the sweep counted. The k-th value is
    unique, so however it is found the cutoffs are the same: a tensor held whole (one block) is
    selected in memory in one sweep, a tensor in several blocks by histograms in two.
    """
    if len(job.spans) == 1:
        found: list[list[Cutoff]] = []

        def select(block: Block) -> None:
            if also is not None:
                also(block)
            wanted = ks() if callable(ks) else ks
            for s in range(streams):
                flat = scores(block, s).reshape(-1)
                row = []
                for k in wanted[s]:
                    if 0 < k <= job.numel:
                        threshold, below = kth_in_memory(flat, k)
                        row.append(Cutoff(k, job.numel, threshold, below))
                    else:
                        row.append(Cutoff(k, job.numel))
                found.append(row)

        job.sweep(select)
        return found
    selection = Selection(streams, job.numel)

    def visit(block: Block) -> None:
        if also is not None and selection._targets is None:
            also(block)
        for s in range(streams):
            if selection._targets is None or selection._targets[s]:
                selection.count(s, scores(block, s))

    job.sweep(visit)
    wanted = ks() if callable(ks) else ks
    selection.choose(wanted)
    if any(selection._targets):
        job.sweep(visit)
    return selection.cutoffs(wanted)
