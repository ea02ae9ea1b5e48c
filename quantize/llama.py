"""llama.cpp (through llama-cpp-python): quantize, split, load and verify GGUF files; the export entry point.

Quantization is llama.cpp's own (`llama_model_quantize`), never re-implemented. Verification of the files
is quantize/verify.py's.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import gguf
import numpy as np

from merger.errors import CancelledError, GGUFError
from quantize.convert import OUTTYPES, convert_folder, gguf_file_name

__all__ = [
    "HUB_FILE_LIMIT",
    "QUANT_TYPES",
    "export_gguf",
    "load_gguf",
    "quantize_gguf",
    "split_gguf",
]

HUB_FILE_LIMIT = 50_000_000_000  # bytes: the Hub refuses single files larger than this

# Quantization types llama.cpp can produce without an importance matrix, by their usual names.
QUANT_TYPES: dict[str, str] = {
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "Q3_K_S": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "Q3_K_L": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "Q5_K_S": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
}

Progress = Callable[[str, float], None]  # (what is happening, fraction of this step done)
Cancel = Callable[[], bool]


def _llama_cpp():  # noqa: ANN202 - the module
    try:
        import llama_cpp
    except ImportError:
        raise GGUFError("quantizing and verifying GGUF needs llama-cpp-python: pip install llama-cpp-python") from None
    log = logging.getLogger("llama-cpp-python")
    if log.level == logging.NOTSET:  # llama.cpp logs every tensor it quantizes; keep errors only
        log.setLevel(logging.ERROR)
    return llama_cpp


def check_quant_type(name: str) -> str:
    """The canonical spelling of a quantization type, or a GGUFError saying what is available."""
    upper = name.strip().upper()
    if upper in QUANT_TYPES:
        return upper
    if upper.startswith(("IQ", "TQ")):
        raise GGUFError(
            f"{name} needs an importance matrix (imatrix), which this exporter does not compute; "
            f"choose one of {', '.join(QUANT_TYPES)}"
        )
    raise GGUFError(f"unknown quantization type {name!r}; choose one of {', '.join(QUANT_TYPES)}")


def quantize_gguf(src: str | Path, dst: str | Path, quant: str) -> Path:
    """Quantize an F32/F16/BF16 GGUF with llama.cpp into `dst` (written under a temporary name first)."""
    llama_cpp = _llama_cpp()
    quant = check_quant_type(quant)
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise GGUFError(f"cannot quantize {src}: no such file")
    tmp = dst.with_name(f".{dst.name}.partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[quant])
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise GGUFError(f"llama.cpp could not quantize {src.name} to {quant} (return code {rc})")
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


_K_QUANT_BLOCK = 256  # llama.cpp's K-quants pack rows in super-blocks of 256 values


def fallback_notice(path: str | Path, quant: str) -> str | None:
    """llama.cpp quantizes a K-quant tensor whose rows are not a multiple of 256 values with another type
    (it says so only on stderr). Read back from the file: one line naming how many tensors fell back, to
    which types, or None when none did."""
    if "_K" not in quant:
        return None
    reader = gguf.GGUFReader(str(path))
    fell: dict[str, int] = {}
    matrices = 0
    for t in reader.tensors:
        if len(t.shape) < 2:
            continue
        matrices += 1
        if int(t.shape[0]) % _K_QUANT_BLOCK and "_K" not in t.tensor_type.name and t.tensor_type.name != "F32":
            fell[t.tensor_type.name] = fell.get(t.tensor_type.name, 0) + 1
    if not fell:
        return None
    kinds = ", ".join(f"{n} as {k}" for k, n in sorted(fell.items()))
    return (f"{Path(path).name}: {sum(fell.values())} of {matrices} weight matrices have rows that are not a multiple "
            f"of {_K_QUANT_BLOCK} values, so llama.cpp falls back to other types for them ({kinds}) instead of "
            f"{quant}; the file is larger than a {quant} file of a full-size model would suggest")


def split_gguf(path: str | Path, max_size: int) -> list[Path]:
    """Split a GGUF into `NAME-0000i-of-0000N.gguf` parts of at most about `max_size` bytes (gguf-split layout).

    llama.cpp loads such a set from its first part. The original file is replaced by the parts; a file
    already under the limit is returned unchanged.
    """
    path = Path(path)
    if path.stat().st_size <= max_size:
        return [path]
    reader = gguf.GGUFReader(path)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    tmp = path.parent / f".{path.name}.split"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        writer = gguf.GGUFWriter(tmp / path.name, arch.contents(), split_max_size=max_size)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
        for t in reader.tensors:
            writer.add_tensor_info(t.name, list(reversed(t.shape.tolist())), np.dtype(np.float32), int(t.n_bytes),
                                   raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(np.asarray(t.data).view(np.uint8).reshape(-1))
        writer.close()
        parts = []
        for part in sorted(tmp.iterdir()):
            part.replace(path.parent / part.name)
            parts.append(path.parent / part.name)
        del reader
        path.unlink()
        return parts
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_gguf(path: str | Path, n_ctx: int = 512):  # noqa: ANN201 - llama_cpp.Llama
    """Load a GGUF (or the first part of a split set) with an F32 KV cache and all logits kept."""
    llama_cpp = _llama_cpp()
    try:
        gpu = -1 if llama_cpp.llama_supports_gpu_offload() else 0  # a CUDA build of llama.cpp: all layers on the GPU
        return llama_cpp.Llama(
            str(path), n_ctx=n_ctx, logits_all=True, type_k=0, type_v=0, verbose=False, n_threads=os.cpu_count() or 1,
            n_gpu_layers=gpu,
        )
    except ValueError as exc:
        raise GGUFError(f"llama.cpp cannot load {Path(path).name}: {exc}") from None


def base_gguf_type(outtype: str | None, quants: Sequence[str]) -> str:
    """The unquantized type everything starts from: the requested F32/BF16/F16, else F16."""
    return outtype if outtype in ("f32", "f16", "bf16") or not quants else "f16"


def export_gguf(
    model_dir: str | Path,
    out_dir: str | Path,
    name: str,
    outtype: str | None = "f16",
    quants: Sequence[str] = (),
    *,
    split_max_size: int = HUB_FILE_LIMIT,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    converted: Path | None = None,
    verify: Callable[[Path, str], None] | None = None,
) -> list[Path]:
    """Write `NAME-<TYPE>.gguf` files for `outtype` and each of `quants`; returns every file written.

    Quantization starts from an F16 (or the requested F32/BF16) file; that intermediate is deleted when
    it was not asked for. Files larger than `split_max_size` are split in the gguf-split layout.
    Everything is checked before the first byte is written; on error or cancel nothing is left behind.
    `converted` is that base file when it was already written (streamed during a merge, at
    out_dir / gguf_file_name(name, base_gguf_type(outtype, quants))): it is not converted again.
    `verify(path, type)` is called on the base file, then on each quantized file as soon as it is written,
    while the base still exists (quantize.verify measures quantized files against it); it may raise.
    """
    quants = [check_quant_type(q) for q in quants]
    if outtype is not None and outtype not in OUTTYPES:
        raise GGUFError(f"unknown GGUF output type {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    if outtype is None and not quants:
        raise GGUFError("nothing to export: give an output type (--outtype) or quantization types (--quant)")
    if quants:
        _llama_cpp()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_type = base_gguf_type(outtype, quants)
    report = progress or (lambda message, fraction: None)
    written: list[Path] = []
    base: Path | None = None
    try:
        base = out_dir / gguf_file_name(name, base_type)
        if converted is None:
            report(f"converting to {base.name}", 0.0)
            convert_folder(
                model_dir, base, base_type, name=name, cancel=cancel,
                progress=lambda done, total: report(f"converting to {base.name}", done / max(total, 1)),
            )
        elif Path(converted) != base:
            raise GGUFError(f"the streamed GGUF is {Path(converted).name}; expected {base.name}")
        keep_base = base_type == outtype
        if verify is not None:
            verify(base, base_type)
        if keep_base:
            written.append(base)
        if outtype == "q8_0" and base_type != "q8_0":
            quants = ["Q8_0", *[q for q in quants if q != "Q8_0"]]
        for k, quant in enumerate(quants):
            if cancel is not None and cancel():
                raise CancelledError("GGUF export cancelled; its partial files were removed")
            report(f"quantizing to {quant}", k / len(quants))
            written.append(quantize_gguf(base, out_dir / gguf_file_name(name, quant), quant))
            if verify is not None:
                verify(written[-1], quant)
        if not keep_base:
            base.unlink()
        final: list[Path] = []
        for path in written:
            final += split_gguf(path, split_max_size)
        report("GGUF export done", 1.0)
        return final
    except BaseException:
        for path in [*written, *([base] if base is not None else [])]:
            path.unlink(missing_ok=True)
        raise
