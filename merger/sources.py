"""Where weights come from: safetensors headers and lazy, exact per-tensor reads.

Tensors are read with plain positional reads of exactly their bytes (no mmap), so resident memory
stays flat however large the model is, and a check can read headers without touching tensor data.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelError

MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorHeader:
    """One tensor's entry in a safetensors header, with absolute byte offsets in its file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def parse_header_bytes(raw: bytes, file: str, data_start: int, file_size: int | None) -> dict[str, TensorHeader]:
    """Validate a safetensors JSON header and turn it into absolute-offset TensorHeaders."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{file}: the safetensors header is not valid JSON; the file is corrupt, "
                         "download it again") from None
    if not isinstance(header, dict):
        raise ModelError(f"{file}: the safetensors header is not a mapping; the file is corrupt")
    out: dict[str, TensorHeader] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            assert dtype in DTYPE_BYTES and all(isinstance(d, int) and d >= 0 for d in shape)
            assert isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
        except (KeyError, TypeError, ValueError, AssertionError):
            raise ModelError(f"{file}: tensor {name} has a malformed header entry; the file is corrupt") from None
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise ModelError(f"{file}: tensor {name} claims {end - begin} bytes but shape {list(shape)} "
                             f"of {dtype} needs {math.prod(shape) * DTYPE_BYTES[dtype]}; the file is corrupt")
        if file_size is not None and data_start + end > file_size:
            raise ModelError(f"{file}: tensor {name} ends past the end of the file (truncated download?); "
                             "delete the file and download it again")
        spans.append((begin, end, name))
        out[name] = TensorHeader(name, dtype, shape, file, data_start + begin, data_start + end)
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise ModelError(f"{file}: tensors {a} and {b} overlap in the file; the file is corrupt")
    return out


def read_safetensors_header(path: str | Path, *, check_size: bool = True) -> dict[str, TensorHeader]:
    """Read only the header of one safetensors file (a few kB, never the tensor data).

    check_size=False accepts a file that ends before its tensors do (a header-only file, as the
    pre-flight check may see); reading tensors always checks.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelError(f"{path.name} is too short to be a safetensors file; download it again")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise ModelError(f"{path.name}: the safetensors header length ({length}) is impossible; "
                                 "the file is corrupt or truncated")
            raw = f.read(length)
    except FileNotFoundError:
        raise ModelError(f"weight file {path} is missing; download the model again") from None
    except IsADirectoryError:
        raise ModelError(f"{path} is a folder, not a safetensors file") from None
    return parse_header_bytes(raw, path.name, 8 + length, size if check_size else None)


def weight_files(folder: str | Path) -> list[str]:
    """The safetensors files of a model folder: the index's shards, or the single file."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, AssertionError, UnicodeDecodeError):
            raise ModelError(f"{index} is not a valid safetensors index (no weight_map)") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if "/" in name or "\\" in name or name.startswith("."):
                raise ModelError(f"{index} names a shard outside the folder ({name}); refusing it")
        return files
    if (folder / SINGLE_FILE).exists():
        return [SINGLE_FILE]
    return sorted(p.name for p in folder.glob("*.safetensors"))


def read_local_headers(folder: str | Path, *, check_size: bool = True) -> dict[str, TensorHeader]:
    """Headers of every tensor in a local model folder (single file or sharded with an index)."""
    folder = Path(folder)
    files = weight_files(folder)
    if not files:
        raise ModelError(f"{folder} has no .safetensors weights; convert the model to safetensors "
                         "(or allow .bin files explicitly)")
    headers: dict[str, TensorHeader] = {}
    index = folder / INDEX_FILE
    expected = json.loads(index.read_text())["weight_map"] if index.exists() else None
    for name in files:
        if not (folder / name).exists():
            raise ModelError(f"{folder.name}: shard {name} listed in {INDEX_FILE} is missing; "
                             "download the model again")
        for tname, h in read_safetensors_header(folder / name, check_size=check_size).items():
            if tname in headers:
                raise ModelError(f"{folder.name}: tensor {tname} appears in two shards; the model is corrupt")
            headers[tname] = h
    if expected is not None:
        missing = sorted(set(expected) - set(headers))
        if missing:
            raise ModelError(f"{folder.name}: {len(missing)} tensors listed in {INDEX_FILE} are in no shard "
                             f"(first: {missing[0]}); download the model again")
    return headers


class TensorReader:
    """Reads tensors from a local model folder by name, one at a time, with positional reads."""

    def __init__(self, folder: str | Path, headers: dict[str, TensorHeader] | None = None) -> None:
        self.folder = Path(folder)
        self.headers = headers if headers is not None else read_local_headers(self.folder)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, file: str) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(self.folder / file, os.O_RDONLY)
            return self._fds[file]

    def read(self, name: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor (or a row range of dim 0 of it; of a 3-D tensor, rows of it flattened to 2-D), in its
        stored dtype, on the CPU.

        `out`, a flat uint8 buffer of at least the tensor's size, is filled and returned viewed as the
        tensor (reusing one buffer avoids a page fault per 4 kB on every read); else a new tensor.
        """
        try:
            h = self.headers[name]
        except KeyError:
            raise ModelError(f"{self.folder.name} has no tensor {name}") from None
        shape = list(h.shape)
        begin, nbytes = h.begin, h.nbytes
        if rows is not None:
            if len(shape) > 2:  # rows of the (experts * rows, columns) matrix: one expert's part of a fused tensor
                shape = [math.prod(shape[:-1]), shape[-1]]
            row_bytes = h.nbytes // shape[0] if shape and shape[0] else 0
            start, stop = rows
            begin += start * row_bytes
            nbytes = (stop - start) * row_bytes
            shape[0] = stop - start
        buf = out[:nbytes] if out is not None and out.numel() >= nbytes else torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        fd, done = self._fd(h.file), 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], begin + done)
            if n <= 0:
                raise ModelError(f"{self.folder.name}/{h.file} ended while reading {name}; "
                                 "the file is truncated, download it again")
            done += n
        return buf.view(TORCH_DTYPES[h.dtype]).reshape(shape)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BinReader:
    """Reads pickle `.bin` checkpoints with torch's weights_only loader; only on explicit request."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "pytorch_model.bin.index.json"
        if index.exists():
            self.files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            self.files = [p.name for p in sorted(self.folder.glob("*.bin"))]
        if not self.files:
            raise ModelError(f"{self.folder} has neither .safetensors nor .bin weights")
        self._where: dict[str, str] = {}
        self.headers: dict[str, TensorHeader] = {}
        for file in self.files:
            for name, tensor in self._load(file).items():
                self._where[name] = file
                dtype = SAFETENSORS_DTYPES[tensor.dtype]
                self.headers[name] = TensorHeader(name, dtype, tuple(tensor.shape), file, 0,
                                                  tensor.numel() * DTYPE_BYTES[dtype])
        self._cache: tuple[str, dict[str, torch.Tensor]] | None = None

    def _load(self, file: str) -> dict[str, torch.Tensor]:
        try:
            state = torch.load(self.folder / file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # a pickle that is not plain tensors is refused, whatever the reason
            raise ModelError(f"{file} cannot be loaded safely ({type(e).__name__}); "
                             "use a safetensors version of the model") from None
        if not isinstance(state, dict):
            raise ModelError(f"{file} does not contain a state dict of tensors")
        return state

    def read(self, name: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Like TensorReader.read; `out` is ignored (the pickle is loaded whole anyway)."""
        file = self._where[name]
        if self._cache is None or self._cache[0] != file:
            self._cache = (file, self._load(file))
        tensor = self._cache[1][name]
        if rows and tensor.dim() > 2:
            tensor = tensor.reshape(-1, tensor.shape[-1])
        return (tensor[rows[0]:rows[1]] if rows else tensor).clone()

    def close(self) -> None:
        self._cache = None


def has_safetensors(folder: str | Path) -> bool:
    return bool(weight_files(folder))


def open_reader(folder: str | Path, *, allow_bin: bool = False) -> TensorReader | BinReader:
    """A reader for a local model folder; `.bin` checkpoints only when allowed."""
    if has_safetensors(folder):
        return TensorReader(folder)
    if any(Path(folder).glob("*.bin")):
        if not allow_bin:
            raise ModelError(f"{Path(folder).name} has only pickle .bin weights; pass --allow-bin to load "
                             "them with torch's safe weights-only loader, or use a safetensors version")
        return BinReader(folder)
    raise ModelError(f"{folder} has no model weights (.safetensors)")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, bf16 included)."""
    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
