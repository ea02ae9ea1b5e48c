"""Streaming sharded safetensors writer.

Every output tensor's name, dtype and shape is known from the plan before any data exists, so each
shard's header is written first and tensor bytes are appended as they are produced: the output is
never held in memory, whatever the model size.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import ModelError
from .sources import DTYPE_BYTES, SAFETENSORS_DTYPES, tensor_bytes

DEFAULT_SHARD_SIZE = 5 * 1000**3


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


def parse_size(text: str | int, what: str = "shard size") -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
             "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4, "K": 1000, "M": 1000**2, "G": 1000**3}
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ModelError(f"{what} '{text}' is not a size; write it like 5GB, 500MB or 2GiB") from None
    if value < 1:
        raise ModelError(f"{what} '{text}' must be positive")
    return int(value)


def assign_shards(plan: list[PlannedTensor], shard_size: int) -> list[list[PlannedTensor]]:
    """Split the plan, in order, into shards of at most shard_size bytes (a bigger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    used = 0
    for t in plan:
        if shards[-1] and used + t.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += t.nbytes
    return shards


class ShardedWriter:
    """Writes the planned tensors, in plan order, into model.safetensors or model-0000i-of-0000N shards."""

    def __init__(self, folder: str | Path, plan: list[PlannedTensor], *, shard_size: int = DEFAULT_SHARD_SIZE,
                 metadata: dict[str, str] | None = None, on_shard: Callable[[Path], None] | None = None) -> None:
        """`on_shard(path)` is called with each shard file once it is complete (e.g. to upload it early)."""
        names = [t.name for t in plan]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the output plan")
        self.folder = Path(folder)
        self.plan = plan
        self.shards = assign_shards(plan, shard_size)
        n = len(self.shards)
        self.files = ["model.safetensors"] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(si, t) for si, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._file = None
        self._shard_index = -1
        self._part_bytes = 0  # bytes of the current tensor written so far (it may come in pieces)
        self._on_shard = on_shard
        self.bytes_written = 0

    def _header(self, shard: list[PlannedTensor]) -> bytes:
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for t in shard:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor; it must come in plan order with the planned dtype and shape."""
        planned = self._expect(name, tensor)
        if self._part_bytes:
            raise ValueError(f"{name} was started piece by piece; finish it with write_part")
        if tuple(tensor.shape) != planned.shape:
            raise ValueError(f"{name}: planned {planned.dtype}{list(planned.shape)}, "
                             f"got {SAFETENSORS_DTYPES[tensor.dtype]}{list(tensor.shape)}")
        self.write_part(name, tensor)

    def write_part(self, name: str, part: torch.Tensor) -> None:
        """Append the next piece of the current planned tensor (its rows in order, or pieces of a row):
        row-major data is contiguous, so the pieces' bytes in order are the tensor's bytes."""
        planned = self._expect(name, part)
        shard_index = self._order[self._next][0]
        if self._part_bytes == 0 and shard_index != self._shard_index:
            self._open(shard_index)
        data = tensor_bytes(part.detach().cpu())
        if self._part_bytes + len(data) > planned.nbytes:
            raise ValueError(f"{name}: more data than its planned {planned.dtype}{list(planned.shape)}")
        self._file.write(data)
        self.bytes_written += len(data)
        self._part_bytes += len(data)
        if self._part_bytes < planned.nbytes:
            return
        self._part_bytes = 0
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != shard_index:
            self._close_file()
            if self._on_shard is not None:
                self._on_shard(self.folder / self.files[shard_index])

    def _expect(self, name: str, tensor: torch.Tensor) -> PlannedTensor:
        """The planned tensor `name` must be the one being written (or the next), with its dtype."""
        if self._next >= len(self._order):
            raise ValueError(f"{name} is not in the output plan")
        planned = self._order[self._next][1]
        if name != planned.name:
            raise ValueError(f"expected {planned.name} next, got {name}")
        if SAFETENSORS_DTYPES[tensor.dtype] != planned.dtype:
            raise ValueError(f"{name}: planned {planned.dtype}{list(planned.shape)}, "
                             f"got {SAFETENSORS_DTYPES[tensor.dtype]}{list(tensor.shape)}")
        return planned

    def _open(self, shard_index: int) -> None:
        self._close_file()
        self._file = open(self.folder / self.files[shard_index], "wb")
        self._file.write(self._header(self.shards[shard_index]))
        self._shard_index = shard_index

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> list[str]:
        """Check every planned tensor was written; write the index when sharded. Returns the file names."""
        if self._next != len(self._order):
            raise ValueError(f"only {self._next} of {len(self._order)} planned tensors were written")
        self._close_file()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in self.plan)},
                     "weight_map": {t.name: self.files[si] for si, t in self._order}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            return self.files + ["model.safetensors.index.json"]
        return list(self.files)

    def abort(self) -> None:
        self._close_file()
