"""Model Stock (https://arxiv.org/abs/2403.19522): interpolate between the base and the models' mean
by a ratio set by the angle between the fine-tuned models' task vectors."""

from __future__ import annotations

import torch

from merger.methods.base import Method, Param
from merger.methods.blocks import Block, Job, Sums, vector_sums


def _pairs(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i, k)]


def stock_ratio(gram: dict[tuple[int, int], torch.Tensor], k: int) -> torch.Tensor:
    """t = k cos / (1 + (k - 1) cos) from float64 Gram entries (any shape), as float32.

    cos is the mean pairwise cosine between the k task vectors. Where 1 + (k - 1) cos vanishes there
    is no finite estimate and the base is kept (t = 0).
    """
    norms = [gram[i, i].sqrt() for i in range(k)]
    cos = torch.stack([
        (gram[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1) for i in range(k) for j in range(i + 1, k)
    ]).mean(dim=0)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, 0, k * cos / torch.where(singular, 1, denominator)).to(torch.float32)


def _model_stock_kernel(job: Job) -> None:
    """w = t * mean(models) + (1 - t) * base, one t per tensor or, with `filter_wise`, per row (last axis)."""
    base = job.base_index
    models = job.other_indices
    k = len(models)
    pairs = _pairs(k)
    filter_wise = job.params["filter_wise"] and len(job.shape) > 0
    local = filter_wise and len(job.shape) > 2  # last-axis rows lie inside a block's dim-0 rows

    def task_vectors(block: Block) -> list[torch.Tensor]:
        return [block.tensors[m] - block.tensors[base] for m in models]

    ratio = None
    if not local:
        sums = Sums(job, len(pairs), "row" if filter_wise else "total")

        def visit(block: Block) -> None:
            vectors = task_vectors(block)
            for p, (i, j) in enumerate(pairs):
                sums.add(block, p, vectors[i], vectors[j])

        job.sweep(visit)
        if filter_wise:
            ratio = stock_ratio({pair: sums.rows(p) for p, pair in enumerate(pairs)}, k)
        else:
            ratio = stock_ratio({pair: torch.tensor(v, dtype=torch.float64) for pair, v in zip(pairs, sums.totals())}, k)

    def produce(block: Block) -> torch.Tensor:
        if local:
            vectors = task_vectors(block)
            t = stock_ratio({(i, j): vector_sums(vectors[i], vectors[j]) for i, j in pairs}, k).unsqueeze(-1)
            del vectors
        elif filter_wise:
            t = block.per_row(ratio)
        else:
            t = ratio
        mean = torch.clone(block.tensors[models[0]], memory_format=torch.contiguous_format)
        for m in models[1:]:
            mean.add_(block.tensors[m])
        mean.div_(k)
        return mean.mul_(t).addcmul_(block.tensors[base], 1 - t)

    job.emit(produce)


MODEL_STOCK = Method(
    name="model_stock",
    pretty_name="Model Stock",
    paper="https://arxiv.org/abs/2403.19522",
    inputs="a base_model plus at least two fine-tuned models; no per-model parameters",
    params=(Param("filter_wise", bool, "shared", False, doc="one ratio per row instead of per tensor"),),
    base="required",
    kernel=_model_stock_kernel,
    scratch=lambda n: n + 3.0,
    min_models=3,
)
