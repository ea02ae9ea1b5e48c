"""Router (gate) weights of a MoE, per gate_mode, with mergekit-moe 0.1.5's numerics.

Each gated expert gets one unit vector per layer, the row of that layer's router:

- `hidden` / `hidden_last`: the base model's hidden state entering each layer at the last prompt token,
  averaged over the prompts (`hidden_avg`: averaged over all positions, padding included, as mergekit
  does); the model runs in bfloat16 with transformers on the merge device.
- `cheap_embed`: the sum of the input embeddings of the prompts' tokens, normalised, the same for
  every layer.
- With negative prompts, their vector is subtracted from the positive one; the result is normalised.
- `random`: standard normal draws; `uniform_random`: uniform in +-1/sqrt(hidden) (torch.nn.Linear's
  initialisation). Drawn from a generator seeded with the run's seed, so `--seed N` here gives the
  routers of `mergekit-moe --random-seed N`.

Prompts are tokenized as mergekit does: the BOS token's text prepended, no other special tokens,
padded on the left with the BOS token (the EOS token when there is none).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import ModelError
from .config import Expert, MoERecipe


def load_tokenizer(folder: Path) -> Any:
    """The base model's tokenizer, set up for batches of prompts padded on the left."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # a missing or unreadable tokenizer: one line
        raise ModelError(f"the base model's tokenizer cannot be loaded ({type(e).__name__}); the gates need it "
                         "to read the prompts") from None
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    bos = tokenizer.bos_token or ""
    batch = tokenizer([bos + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def embedding_vector(embed: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The prompts' summed token embeddings (padding masked out), as a unit vector in float32."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if int(ids.max()) >= embed.shape[0]:
        raise ModelError(f"the tokenizer produced token id {int(ids.max())}, past the embedding's "
                         f"{embed.shape[0]} rows")
    rows = embed.float()[ids] * mask.unsqueeze(-1)
    total = rows.sum(dim=1).sum(dim=0, keepdim=True)
    return total / total.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def hidden_vectors(model: Any, batch: dict[str, torch.Tensor], *, average: bool) -> torch.Tensor:
    """(layers, hidden): the hidden state entering each layer, averaged over the prompts."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True, return_dict=True)
    states = torch.stack(out.hidden_states[:-1])  # (layers, prompts, tokens, hidden)
    per_prompt = states.sum(dim=2) / states.shape[2] if average else states[:, :, -1, :]
    return (per_prompt.sum(dim=1) / per_prompt.shape[1]).cpu()


def load_hidden_model(folder: Path, device: torch.device) -> Any:
    """The base model in bfloat16 on the merge device, for the `hidden` gates."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    except Exception as e:
        raise ModelError(f"transformers cannot load the base model for the hidden-state gates "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:150]}); use gate_mode: cheap_embed") from None
    return model.to(device).eval()


def random_gates(mode: str, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randn(shape, generator=generator)
    scale = math.sqrt(1.0 / shape[2])
    return torch.rand(shape, generator=generator) * 2 * scale - scale


def gate_vectors(recipe: MoERecipe, base_folder: Path, *, num_layers: int, hidden: int, embed: Callable[[], torch.Tensor],
                 device: torch.device, seed: int) -> torch.Tensor:
    """(layers, gated experts, hidden): every router row, for `recipe.gated_experts` in order.

    `embed()` reads the base model's input embedding (only `cheap_embed` calls it)."""
    experts: tuple[Expert, ...] = recipe.gated_experts
    mode = recipe.gate_mode
    if mode in ("random", "uniform_random"):
        return random_gates(mode, (num_layers, len(experts), hidden), seed)
    tokenizer = load_tokenizer(base_folder)
    if mode == "cheap_embed":
        table = embed()

        def vector(prompts: Sequence[str]) -> torch.Tensor:
            return embedding_vector(table, tokenize(tokenizer, prompts)).repeat(num_layers, 1)
    else:
        model = load_hidden_model(base_folder, device)

        def vector(prompts: Sequence[str]) -> torch.Tensor:
            return hidden_vectors(model, tokenize(tokenizer, prompts), average=mode == "hidden_avg")

    rows = []
    for e in experts:
        v = vector(e.positive_prompts)
        if e.negative_prompts:
            v = v - vector(e.negative_prompts)
        rows.append(v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    gates = torch.stack(rows, dim=1)
    if gates.shape != (num_layers, len(experts), hidden):
        raise ModelError(f"the gates came out {list(gates.shape)}, expected {[num_layers, len(experts), hidden]}")
    return gates


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose router rows are nearly linearly dependent (condition number above `threshold`, mergekit's
    test): some experts there will rarely be chosen."""
    return [i for i in range(gates.shape[0]) if float(torch.linalg.cond(gates[i].float())) > threshold]
