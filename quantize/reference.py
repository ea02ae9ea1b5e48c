"""A plain torch forward pass of the streamed families, the yardstick GGUF logits are checked against.

It runs in float32 on the CPU one layer at a time over the whole (short) sequence, reading each
layer's tensors only while it is computed: memory is one layer plus the embeddings, whatever the
depth (transformers would load the whole model). The maths follows the Hugging Face modeling code of
each family (rotate-half rope with linear or Llama-3 scaling, GQA, Phi-2's parallel block and partial
rope, Phi-3's fused projections, Gemma's (1 + w) norms, scaled embeddings and Gemma-2's extra norms and
soft-capping); tests hold it to transformers at 1e-5. The families exported by llama.cpp's converter
are checked against transformers itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from merger.errors import GGUFError
from merger.sources import TensorReader, read_local_headers
from quantize.convert import check_convertible, stream_reason
from quantize.rope import llama3_factors, rope_parameters, rope_type

__all__ = ["cached_weights", "reference_logits"]

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
}


class _Weights:
    """Reads one tensor at a time, as float32, from a local safetensors folder; `cache=True` keeps what it
    read (for many forwards of a small model, e.g. greedy sampling)."""

    def __init__(self, folder: Path, cache: bool = False, device: torch.device | str = "cpu") -> None:
        self.reader = TensorReader(folder)
        self.device = torch.device(device)
        self.cache: dict[str, torch.Tensor] | None = {} if cache else None

    def __contains__(self, name: str) -> bool:
        return name in self.reader.headers

    def __getitem__(self, name: str) -> torch.Tensor:
        if self.cache is not None and name in self.cache:
            return self.cache[name]
        tensor = self.reader.read(name).to(self.device, torch.float32)
        if self.cache is not None:
            self.cache[name] = tensor
        return tensor


def cached_weights(model_dir: str | Path, device: torch.device | str = "cpu") -> _Weights:
    """Weights kept in memory once read: pass as `weights=` to repeated reference_logits calls."""
    return _Weights(Path(model_dir), cache=True, device=device)


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + w)


def _rope(x: torch.Tensor, rot_dim: int, theta: float, scale: float, divisors: torch.Tensor | None) -> torch.Tensor:
    """Rotate-half rope on the first `rot_dim` features of each head; x is (heads, seq, head_dim).

    `scale` divides positions (linear scaling), `divisors` each frequency (llama3 scaling)."""
    seq = x.shape[1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=x.device) / rot_dim))
    if divisors is not None:
        inv_freq = inv_freq / divisors.to(x.device)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32, device=x.device) / scale, inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], -1)
    return torch.cat([rot * cos + rotated * sin, rest], -1)


TRANSFORMERS_MAX_PARAMS = 2_000_000_000  # families without our layer-by-layer forward load whole in transformers


def reference_logits(model_dir: str | Path, ids: list[int], weights: _Weights | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Float32 logits (seq, vocab), on the CPU, of the model in `model_dir` for token ids `ids` (no KV cache),
    computed on `device` (or that of `weights`)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    reason = check_convertible(config)
    if reason:
        raise GGUFError(reason.replace("GGUF export", "GGUF verification"))
    if stream_reason(config) is not None:
        params = sum(h.numel for h in read_local_headers(model_dir).values())
        if params > TRANSFORMERS_MAX_PARAMS:
            raise GGUFError(f"no reference forward for {config.get('model_type')} above "
                            f"{TRANSFORMERS_MAX_PARAMS / 1e9:.0f}B parameters (transformers would load the whole model)")
        return _transformers_logits(model_dir, ids)
    if config.get("model_type") == "phi-msft":
        raise GGUFError("GGUF verification needs the current Phi-2 layout (model.*), not phi-msft")
    kind = config["model_type"]
    w = weights or _Weights(model_dir, device=device)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    rope = rope_parameters(config)  # rope_scaling (transformers 4) or rope_parameters (5)
    theta = float(rope.get("rope_theta", 10000.0))
    rot_dim = int(rope.get("partial_rotary_factor", 1.0) * head_dim)
    scale = float(rope["factor"]) if rope_type(config) == "linear" else 1.0
    divisors = llama3_factors(config) if rope_type(config) == "llama3" else None
    act = _ACTIVATIONS[config.get("hidden_activation") or config.get("hidden_act", "silu")]
    gemma = kind in ("gemma", "gemma2")
    offset = 1.0 if gemma else 0.0
    eps = config.get("rms_norm_eps", config.get("layer_norm_eps", 1e-6))
    seq = len(ids)

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        if kind == "phi":
            return F.layer_norm(x, (hidden,), w[name + ".weight"], w[name + ".bias"], eps)
        return _rms_norm(x, w[name + ".weight"], eps, offset)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        bias = w[name + ".bias"] if name + ".bias" in w else None
        return F.linear(x, w[name + ".weight"], bias)

    def attention(x: torch.Tensor, p: str, layer: int) -> torch.Tensor:
        if kind == "phi3":
            q, k, v = linear(x, p + "qkv_proj").split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
        else:
            q, k, v = (linear(x, p + f"{n}_proj") for n in "qkv")
        q = q.view(seq, heads, head_dim).transpose(0, 1)
        k = k.view(seq, kv_heads, head_dim).transpose(0, 1)
        v = v.view(seq, kv_heads, head_dim).transpose(0, 1)
        if kind == "qwen3":
            q = _rms_norm(q, w[p + "q_norm.weight"], eps, 0.0)
            k = _rms_norm(k, w[p + "k_norm.weight"], eps, 0.0)
        q, k = _rope(q, rot_dim, theta, scale, divisors), _rope(k, rot_dim, theta, scale, divisors)
        k = k.repeat_interleave(heads // kv_heads, 0)
        v = v.repeat_interleave(heads // kv_heads, 0)
        scores = q @ k.transpose(1, 2) / math.sqrt(config.get("query_pre_attn_scalar", head_dim))
        if config.get("attn_logit_softcapping"):
            cap = config["attn_logit_softcapping"]
            scores = torch.tanh(scores / cap) * cap
        pos = torch.arange(seq, device=x.device)
        allowed = pos[None, :] <= pos[:, None]
        window = config.get("sliding_window")
        if config.get("layer_types"):
            sliding = config["layer_types"][layer] == "sliding_attention"
        else:
            sliding = kind == "gemma2" and layer % 2 == 0 or kind in ("mistral", "phi3") or (
                kind in ("qwen2", "qwen3") and config.get("use_sliding_window")
            )
        if window and sliding:
            allowed &= pos[:, None] - pos[None, :] < window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(seq, heads * head_dim)
        return linear(out, p + ("dense" if kind == "phi" else "o_proj"))

    def mlp(x: torch.Tensor, p: str) -> torch.Tensor:
        if kind == "phi":
            return linear(act(linear(x, p + "fc1")), p + "fc2")
        if kind == "phi3":
            gate, up = linear(x, p + "gate_up_proj").chunk(2, -1)
        else:
            gate, up = linear(x, p + "gate_proj"), linear(x, p + "up_proj")
        return linear(act(gate) * up, p + "down_proj")

    try:
        embed = w["model.embed_tokens.weight"]
        x = embed[torch.tensor(ids, device=embed.device)]
        if gemma:
            x = x * torch.tensor(math.sqrt(hidden), dtype=torch.float32)
        for layer in range(config["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            if kind == "phi":
                h = norm(x, p + "input_layernorm")
                x = x + attention(h, p + "self_attn.", layer) + mlp(h, p + "mlp.")
            elif kind == "gemma2":
                x = x + norm(attention(norm(x, p + "input_layernorm"), p + "self_attn.", layer), p + "post_attention_layernorm")
                x = x + norm(mlp(norm(x, p + "pre_feedforward_layernorm"), p + "mlp."), p + "post_feedforward_layernorm")
            else:
                x = x + attention(norm(x, p + "input_layernorm"), p + "self_attn.", layer)
                x = x + mlp(norm(x, p + "post_attention_layernorm"), p + "mlp.")
        x = norm(x, "model.final_layernorm" if kind == "phi" else "model.norm")
        if "lm_head.weight" in w and not config.get("tie_word_embeddings", False):
            logits = linear(x, "lm_head")
        else:
            logits = x @ embed.T
        if config.get("final_logit_softcapping"):
            cap = config["final_logit_softcapping"]
            logits = torch.tanh(logits / cap) * cap
        return logits.cpu()
    finally:
        w.reader.close()


def _transformers_logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """Float32 logits from transformers' own implementation, for the families exported by llama.cpp's
    converter (the whole model is loaded: verification is limited to small models by its caller)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise GGUFError("verifying this architecture's GGUF needs transformers: pip install transformers") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise GGUFError(f"transformers cannot load {model_dir.name} to verify its GGUF: {exc}") from None
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()
