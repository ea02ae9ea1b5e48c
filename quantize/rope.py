"""Rotary position scaling as config.json spells it, read the way llama.cpp's converter reads it.

Hub configs saved by transformers 4 write `rope_scaling` (with `type` or `rope_type`) and a top-level
`rope_theta`; transformers 5 writes everything into `rope_parameters`. `rope_parameters(config)` gives
one dict for both spellings. Llama-3-style scaling ("llama3") changes each rotary frequency by a
factor; llama.cpp reads those factors from a `rope_freqs.weight` tensor, which `llama3_factors` computes
with the same float32 arithmetic as llama.cpp's converter, so the two files hold identical bytes.
"""

from __future__ import annotations

import math

import torch

__all__ = ["head_dim", "llama3_factors", "rope_parameters", "rope_type"]

# Keys llama.cpp's converter mirrors from the top level of config.json into the rope parameters.
_MIRRORED = ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings")


def rope_parameters(config: dict) -> dict:
    """The rope parameters of a config in either spelling, with top-level rope keys mirrored in."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params = dict(params.get("full_attention", params))  # per-layer-type rope (Gemma 3): the global one
    if "rope_type" not in params and params.get("type") is not None:
        params["rope_type"] = params["type"]
    for key in _MIRRORED:
        if key not in params and config.get(key) is not None:
            params[key] = config[key]
    return params


def rope_type(config: dict) -> str:
    """'default', 'linear', 'llama3', 'yarn', 'longrope', 'dynamic', ... (lower case)."""
    return str(rope_parameters(config).get("rope_type") or "default").lower()


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def llama3_factors(config: dict) -> torch.Tensor:
    """Llama 3.1's per-frequency divisors (float32, head_dim / 2 of them).

    Frequencies whose wavelength is shorter than original_context / high_freq_factor are kept, those
    longer than original_context / low_freq_factor are divided by `factor`, and the ones between are
    blended smoothly (Meta's Llama 3.1 reference code; transformers' `_compute_llama3_parameters`).
    """
    params = rope_parameters(config)
    base = params.get("rope_theta", 10000.0)
    dim = head_dim(config)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = params.get("factor", 8.0)
    low = params.get("low_freq_factor", 1.0)
    high = params.get("high_freq_factor", 4.0)
    context = params.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < context / high, torch.ones_like(freqs), blended)
    return torch.where(wavelen > context / low, torch.full_like(freqs, factor), out).to(torch.float32)
