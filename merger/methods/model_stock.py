"""Model Stock (https://arxiv.org/abs/2403.19522): interpolate between the base and the models' mean
by a ratio set by the angle between the fine-tuned models' task vectors."""

from __future__ import annotations

import torch

from merger.methods.base import MergeInputs, Method, Param
from merger.methods.reduce import CHUNK_ELEMENTS


def _task_vector_gram(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    """Per row of the 2-D `base`, the float64 Gram matrix of the task vectors: [rows, k, k]."""
    rows, columns = base.shape
    k = len(models)
    gram = torch.zeros((rows, k, k), dtype=torch.float64, device=base.device)
    column_block = max(1, CHUNK_ELEMENTS // k)
    row_block = max(1, CHUNK_ELEMENTS // (k * min(columns, column_block)))
    for r0 in range(0, rows, row_block):
        r1 = r0 + row_block
        for c0 in range(0, columns, column_block):
            c1 = c0 + column_block
            vectors = torch.stack([m[r0:r1, c0:c1] - base[r0:r1, c0:c1] for m in models]).double()
            gram[r0:r1] += torch.einsum("ibc,jbc->bij", vectors, vectors)
    return gram


def _rows(x: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """The vectors that get one ratio each: rows along the last axis, or the whole tensor."""
    return x.reshape(-1, x.shape[-1]) if filter_wise and x.dim() else x.reshape(1, -1)


def model_stock(base: torch.Tensor, models: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """w = t * mean(models) + (1 - t) * base, t = k cos / (1 + (k - 1) cos).

    cos is the mean pairwise cosine between the k task vectors, over the whole tensor or, with
    `filter_wise`, per row (last axis). Where 1 + (k - 1) cos vanishes there is no finite estimate
    and the base is kept (t = 0).
    """
    shape = base.shape
    base2d = _rows(base, filter_wise)
    models2d = [_rows(m, filter_wise) for m in models]
    gram = _task_vector_gram(base2d, models2d)
    k = len(models)
    norms = torch.diagonal(gram, dim1=1, dim2=2).sqrt()
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    cos = torch.stack(
        [(gram[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).clamp(-1, 1) for i, j in pairs]
    ).mean(dim=0)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    ratio = torch.where(singular, 0, k * cos / torch.where(singular, 1, denominator))
    ratio = ratio.to(torch.float32).unsqueeze(-1)
    mean = models2d[0].clone()
    for m in models2d[1:]:
        mean.add_(m)
    mean.div_(k)
    return mean.mul_(ratio).addcmul_(base2d, 1 - ratio).reshape(shape)


def _model_stock_kernel(inputs: MergeInputs) -> torch.Tensor:
    models = [inputs.tensors[i] for i in inputs.other_indices]
    return model_stock(inputs.base, models, inputs.params["filter_wise"])


MODEL_STOCK = Method(
    name="model_stock",
    pretty_name="Model Stock",
    paper="https://arxiv.org/abs/2403.19522",
    inputs="a base_model plus at least two fine-tuned models; no per-model parameters",
    params=(Param("filter_wise", bool, "shared", False, doc="one ratio per row instead of per tensor"),),
    base="required",
    kernel=_model_stock_kernel,
    min_models=3,
)
