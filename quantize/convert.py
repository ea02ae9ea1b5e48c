"""Hugging Face model folder -> GGUF, written with the `gguf` package, one tensor at a time.

Everything llama.cpp needs besides the weights (hyperparameter keys, tokenizer, tensor names and
layouts) is derived here from config.json and the tokenizer files. Tensor data is streamed: the
tensor infos are declared up front (names and shapes are known from safetensors headers or a merge
plan), then each tensor is transformed, cast and written as it arrives, so peak memory is one
tensor whatever the model size. `GGUFStream` is that sink; `convert_folder` feeds it from files.
Families (and rope scalings) the stream does not cover are converted by llama.cpp's own converter
(quantize/upstream.py) from the finished folder; `check_convertible` says which models can be exported.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from merger.errors import CancelledError, GGUFError
from merger.sources import TensorReader, read_local_headers
from quantize.rope import head_dim as _head_dim
from quantize.rope import llama3_factors, rope_parameters, rope_type
from quantize.tokenizer import _adds_dummy_prefix, write_vocab  # noqa: F401  (_adds_dummy_prefix: tests)

__all__ = [
    "OUTTYPES",
    "GGUFStream",
    "check_convertible",
    "convert_folder",
    "gguf_file_name",
    "exportable_architectures",
    "normalized_config",
    "stream_reason",
    "supported_architectures",
]

Progress = Callable[[int, int], None]  # (bytes done, bytes total)
Cancel = Callable[[], bool]


@dataclass(frozen=True)
class _Arch:
    """How one Hugging Face architecture becomes a llama.cpp architecture."""

    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # HF rotate-half rope -> llama.cpp "normal" rope needs q/k rows interleaved
    norm_offset: float = 0.0  # Gemma stores RMSNorm weights as w where the model uses (1 + w)
    layer_norm: bool = False  # LayerNorm (eps key layer_norm_epsilon) instead of RMSNorm
    head_dim_keys: bool = False  # write attention.key_length/value_length
    softcapping: bool = False
    sliding_window: bool = False
    sentencepiece_first: bool = False  # prefer tokenizer.model when both tokenizer files exist


_ARCHS: dict[str, _Arch] = {
    "LlamaForCausalLM": _Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, sentencepiece_first=True),
    "MistralForCausalLM": _Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, sentencepiece_first=True),
    "Qwen2ForCausalLM": _Arch(gguf.MODEL_ARCH.QWEN2),
    "Qwen3ForCausalLM": _Arch(gguf.MODEL_ARCH.QWEN3, head_dim_keys=True),
    "PhiForCausalLM": _Arch(gguf.MODEL_ARCH.PHI2, layer_norm=True),
    "Phi3ForCausalLM": _Arch(gguf.MODEL_ARCH.PHI3, sliding_window=True),
    "GemmaForCausalLM": _Arch(gguf.MODEL_ARCH.GEMMA, norm_offset=1.0, head_dim_keys=True, sentencepiece_first=True),
    "Gemma2ForCausalLM": _Arch(
        gguf.MODEL_ARCH.GEMMA2, norm_offset=1.0, head_dim_keys=True, softcapping=True, sliding_window=True,
        sentencepiece_first=True,
    ),
}

# Old Phi-2 checkpoints (model_type "phi-msft") name their config keys differently.
_LEGACY_PHI_KEYS = {
    "n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
    "n_inner": "intermediate_size", "n_positions": "max_position_embeddings",
    "layer_norm_epsilon": "layer_norm_eps",
}

# Output types: name in file names -> (file type, type of 2-D weights). 1-D tensors stay F32.
OUTTYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}


# Architectures whose GGUF is written by llama.cpp's own converter (quantize/upstream.py), with the
# same verification after: each is covered by a tiny-model test (tests/test_gguf_families.py). The
# streamed architectures above go there too when their config uses a rope scaling we do not stream.
LLAMA_CPP_ARCHITECTURES = (
    "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM", "Olmo2ForCausalLM",
    "GraniteForCausalLM", "CohereForCausalLM", "Starcoder2ForCausalLM", "StableLmForCausalLM",
)
# Variants llama.cpp's converter writes but llama.cpp (this version) cannot load: (architecture, config key).
_LLAMA_CPP_UNLOADABLE = {("CohereForCausalLM", "use_qk_norm"): "Command-R+'s q/k norms"}
# Rope scalings written by the streaming converter: llama3's rope_freqs tensor only for llama.cpp's llama arch.
_STREAMED_ROPE = ("default", "linear")


def supported_architectures() -> list[str]:
    """The Hugging Face `architectures` values the streaming converter handles."""
    return list(_ARCHS)


def exportable_architectures() -> list[str]:
    """Every `architectures` value GGUF export accepts: streamed, or through llama.cpp's converter."""
    return [*_ARCHS, *LLAMA_CPP_ARCHITECTURES]


def normalized_config(config: dict) -> dict:
    """config.json with legacy Phi-2 keys renamed to the current ones (other configs unchanged)."""
    if config.get("model_type") != "phi-msft":
        return config
    out = {_LEGACY_PHI_KEYS.get(k, k): v for k, v in config.items()}
    out["intermediate_size"] = out.get("intermediate_size") or 4 * out["hidden_size"]
    out["partial_rotary_factor"] = config["rotary_dim"] / (config["n_embd"] / config["n_head"])
    out["hidden_act"] = config.get("activation_function", "gelu_new")
    return out


def stream_reason(config: dict) -> str | None:
    """None when the streaming converter writes this model's GGUF (one pass, during a merge), else why not."""
    archs = config.get("architectures") or []
    if len(archs) != 1 or archs[0] not in _ARCHS:
        return f"the streaming converter does not cover {', '.join(archs) or '(no architecture)'}"
    kind = rope_type(config)
    if kind in _STREAMED_ROPE or (kind == "llama3" and _ARCHS[archs[0]].gguf_arch == gguf.MODEL_ARCH.LLAMA):
        return None
    return f"the streaming converter does not cover rope scaling {kind!r} of {archs[0]}"


def check_convertible(config: dict) -> str | None:
    """None when the model can be exported to GGUF, else a one-line reason (for the pre-flight check)."""
    archs = config.get("architectures") or []
    for (arch, key), what in _LLAMA_CPP_UNLOADABLE.items():
        if archs == [arch] and config.get(key):
            return f"llama.cpp cannot load {what} ({key} in config.json); GGUF export supports {arch} without them"
    if stream_reason(config) is None or (len(archs) == 1 and archs[0] in LLAMA_CPP_ARCHITECTURES + tuple(_ARCHS)):
        return None
    return (
        f"GGUF export does not support architecture {', '.join(archs) or '(none in config.json)'}; "
        f"supported: {', '.join(exportable_architectures())}"
    )


def _arch(config: dict) -> _Arch:
    reason = stream_reason(config)
    if reason:
        raise GGUFError(reason)
    return _ARCHS[config["architectures"][0]]


def gguf_file_name(name: str, type_name: str) -> str:
    """`NAME-<TYPE>.gguf`, the naming people expect on the Hub (merged-F16.gguf, merged-Q4_K_M.gguf)."""
    return f"{name}-{type_name.upper()}.gguf"


# ------------------------------------------------------------------------------ hyperparameters

def _write_hparams(w: gguf.GGUFWriter, config: dict, arch: _Arch, n_vocab: int) -> None:
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    head_dim = _head_dim(config)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(config.get("num_key_value_heads") or heads)
    if arch.layer_norm:
        w.add_layer_norm_eps(config["layer_norm_eps"])
    else:
        w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = rope_parameters(config)  # rope_scaling (transformers 4) or rope_parameters (5)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    partial = rope.get("partial_rotary_factor", 1.0)
    w.add_rope_dimension_count(int(partial * head_dim))
    if arch.head_dim_keys or "head_dim" in config:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if rope_type(config) == "linear":  # llama3: the rope_freqs tensor, no keys (as llama.cpp's converter)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if arch.gguf_arch == gguf.MODEL_ARCH.PHI3:
        w.add_rope_scaling_orig_ctx_len(config.get("original_max_position_embeddings", config["max_position_embeddings"]))
    if arch.softcapping:
        w.add_attn_logit_softcapping(config.get("attn_logit_softcapping") or 0.0)
        w.add_final_logit_softcapping(config.get("final_logit_softcapping") or 0.0)
    if arch.sliding_window and config.get("sliding_window"):
        w.add_sliding_window(config["sliding_window"])
    w.add_vocab_size(n_vocab)


# -------------------------------------------------------------------------------------- tensors

@dataclass
class _Planned:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    nbytes: int


def _tensor_type(shape: Sequence[int], wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """1-D tensors stay F32 (norms, biases); rows that do not fill whole Q8_0 blocks fall back to F16."""
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return wanted


def _nbytes(shape: Sequence[int], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's rows from HF rotate-half pairs (i, i + d/2) to llama.cpp adjacent pairs (2i, 2i+1)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFStream:
    """A GGUF file written tensor by tensor, in the order the tensors were declared.

    Declare every (Hugging Face name, shape) first, then `write(name, tensor)` each in that order, then
    `close()`, which moves the finished file(s) to `path` (and split siblings). Until then the output
    lives in a hidden temporary folder next to it, removed by `abort()` or on an exception in `with`.
    """

    def __init__(
        self,
        path: str | Path,
        config: dict,
        tokenizer_dir: str | Path,
        tensors: Sequence[tuple[str, Sequence[int]]],
        outtype: str = "f16",
        *,
        name: str | None = None,
        split_max_size: int = 0,
    ) -> None:
        if outtype not in OUTTYPES:
            raise GGUFError(f"unknown GGUF output type {outtype!r}; choose one of {', '.join(OUTTYPES)}")
        self.path = Path(path)
        config = normalized_config(config)
        arch = _arch(config)
        self._config, self._arch = config, arch
        file_type, wanted = OUTTYPES[outtype]
        n_blocks = config["num_hidden_layers"]
        names = gguf.get_tensor_name_map(arch.gguf_arch, n_blocks)
        shapes = dict(tensors)
        tied = config.get("tie_word_embeddings", False) and "lm_head.weight" in shapes
        self._plan: list[_Planned] = []
        for hf_name, shape in tensors:
            if tied and hf_name == "lm_head.weight":
                continue  # llama.cpp reuses token_embd for tied output
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise GGUFError(f"tensor {hf_name} has no llama.cpp equivalent for {arch.gguf_arch.name.lower()}")
            qtype = _tensor_type(shape, wanted)
            self._plan.append(_Planned(hf_name, gguf_name, tuple(shape), qtype, _nbytes(shape, qtype)))
        self._skipped = {"lm_head.weight"} if tied else set()
        embed = next((p for p in self._plan if p.gguf_name == "token_embd.weight"), None)
        if embed is None:
            raise GGUFError("the model has no token embedding tensor")
        n_vocab = embed.shape[0]
        # Tensors llama.cpp needs that the checkpoint has no counterpart for, written right after the header.
        generated: list[tuple[str, torch.Tensor]] = []
        if rope_type(config) == "llama3":
            generated.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_factors(config)))

        self._writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch.gguf_arch], split_max_size=split_max_size)
        w = self._writer
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or self.path.stem)
        w.add_file_type(int(file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_hparams(w, config, arch, n_vocab)
        write_vocab(w, Path(tokenizer_dir), n_vocab, config, sentencepiece_first=arch.sentencepiece_first)
        for gguf_name, data in generated:
            w.add_tensor_info(gguf_name, tuple(data.shape), np.dtype(np.float32), data.numel() * 4)
        for p in self._plan:
            w.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
        w.add_size_label(gguf.size_label(*w.get_total_parameter_count()))
        # Everything that can be refused has been checked: only now touch the disk.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.parent / f".{self.path.name}.partial"
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir()
        try:
            w.write_header_to_file(self._tmp / self.path.name)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for _, data in generated:
                w.write_tensor_data(data.numpy())
        except BaseException:
            self.abort()
            raise
        self._next = 0
        self.total_bytes = sum(p.nbytes for p in self._plan)
        self.written_bytes = 0

    def expects(self) -> list[str]:
        """The Hugging Face tensor names still to be written, in order."""
        return [p.hf_name for p in self._plan[self._next:]]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Transform (rope permutation, norm offset), cast and append one tensor."""
        if name in self._skipped:
            return
        if self._next >= len(self._plan) or self._plan[self._next].hf_name != name:
            expected = self._plan[self._next].hf_name if self._next < len(self._plan) else "nothing"
            raise GGUFError(f"GGUF tensors arrived out of order: got {name}, expected {expected}")
        p = self._plan[self._next]
        if tuple(tensor.shape) != p.shape:
            raise GGUFError(f"tensor {name} has shape {tuple(tensor.shape)}, declared {p.shape}")
        data = self._transform(p, tensor.detach().cpu())
        if p.qtype == gguf.GGMLQuantizationType.F32:
            out = data.to(torch.float32).contiguous().numpy()
        elif p.qtype == gguf.GGMLQuantizationType.F16:
            out = data.to(torch.float16).contiguous().numpy()  # torch's cast is much faster than numpy's
        else:
            out = gguf.quants.quantize(data.to(torch.float32).contiguous().numpy(), p.qtype)
        self._writer.write_tensor_data(out)
        self._next += 1
        self.written_bytes += p.nbytes

    def _transform(self, p: _Planned, data: torch.Tensor) -> torch.Tensor:
        arch, config = self._arch, self._config
        if arch.permute_qk and p.gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = config["num_attention_heads"]
            if p.gguf_name.split(".")[-2] == "attn_k":
                heads = config.get("num_key_value_heads") or heads
            data = _permute_rope_rows(data, heads)
        if arch.norm_offset and p.gguf_name.endswith("norm.weight"):
            data = data.to(torch.float32) + arch.norm_offset
        return data

    def close(self) -> list[Path]:
        """Finish the file(s) and move them into place; returns the final paths."""
        if self._next != len(self._plan):
            self.abort()
            raise GGUFError(f"GGUF export stopped early: {len(self._plan) - self._next} tensors were never written")
        self._writer.close()
        done = []
        for part in sorted(self._tmp.iterdir()):
            target = self.path.parent / part.name
            part.replace(target)
            done.append(target)
        self._tmp.rmdir()
        return done

    def abort(self) -> None:
        """Remove everything written so far."""
        self._writer.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> GGUFStream:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is not None:
            self.abort()


# --------------------------------------------------------------------------------- from a folder

_LAYER = re.compile(r"\.(\d+)\.")


def _gguf_order(names: Iterable[str]) -> list[str]:
    """Embedding first, then layers in numeric order, then the rest: the order llama.cpp files use."""
    def key(name: str) -> tuple[int, int, str]:
        m = _LAYER.search(name)
        if m:
            return (1, int(m.group(1)), name)
        return (0 if "embed" in name or "wte" in name else 2, 0, name)
    return sorted(names, key=key)


def convert_folder(
    model_dir: str | Path,
    out_path: str | Path,
    outtype: str = "f16",
    *,
    name: str | None = None,
    split_max_size: int = 0,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> list[Path]:
    """Convert a local safetensors model folder to GGUF at `out_path`; returns the written file(s).

    Tensors are read one at a time with plain positional reads (merger.sources.TensorReader), so
    neither the input nor the output is ever held in memory or mapped. Models the streaming converter
    does not cover (stream_reason) are converted by llama.cpp's own converter instead.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise GGUFError(f"{model_dir} has no config.json; point at a Hugging Face model folder")
    config = json.loads(config_path.read_text())
    if outtype not in OUTTYPES:
        raise GGUFError(f"unknown GGUF output type {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    if stream_reason(normalized_config(config)) is not None:
        reason = check_convertible(normalized_config(config))
        if reason:
            raise GGUFError(reason)
        from quantize.llama import split_gguf
        from quantize.upstream import run_converter

        path = run_converter(model_dir, out_path, outtype, name=name, cancel=cancel)
        if progress is not None:
            progress(1, 1)
        return split_gguf(path, split_max_size) if split_max_size else [path]
    headers = read_local_headers(model_dir)
    order = _gguf_order(headers)
    stream = GGUFStream(
        out_path, config, model_dir, [(n, headers[n].shape) for n in order], outtype, name=name,
        split_max_size=split_max_size,
    )
    with stream, TensorReader(model_dir, headers) as reader:
        for tensor_name in order:
            if cancel is not None and cancel():
                raise CancelledError("GGUF export cancelled; its partial files were removed")
            stream.write(tensor_name, reader.read(tensor_name))
            if progress is not None:
                progress(stream.written_bytes, stream.total_bytes)
        return stream.close()
