"""The memory budget of a merge: how large a block of a tensor is merged at once, and what a recipe needs.

Peak memory is the process's base (Python, torch, the plan) plus the working set of one block: its
stored bytes as read, its float32 copies, the method's temporaries and the output being written. The
block size is chosen so that the working set stays within the budget, whatever the tensor size; the
budget defaults to half the available RAM on a CPU and 80% of the free memory on a GPU. The check and
the choice of hosted hardware use `memory_needed`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .methods import Method

MIN_BUDGET = 64 * 1024**2
BASE_RAM = 700 * 1024**2  # measured: python -m merger run with torch imported, before any tensor (bench/RESULTS.md)
REDUCTION_BYTES = 48 * 1024**2  # float64 pieces of the exact sums (blocks.granule_sums), a constant
CUDA_CONTEXT = 600 * 1024**2  # a CUDA context and torch's kernels on the device


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget(device: torch.device) -> int:
    """Half the available RAM on a CPU; 80% of the free memory of a GPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(MIN_BUDGET, int(free * 0.8))
    return max(MIN_BUDGET, available_ram() // 2)


@dataclass(frozen=True)
class ElementCost:
    """Bytes per entry of a block, on the host and on the merging device (the same one on a CPU)."""

    host: float
    device: float

    def block_elements(self, budget: int, cuda: bool) -> int:
        per = self.device if cuda else self.host + self.device
        usable = budget - REDUCTION_BYTES if budget > 2 * REDUCTION_BYTES else budget // 2
        return max(1, int(usable // per))


def element_cost(method: Method | None, stored_bytes: Sequence[int], out_bytes: int, cuda: bool) -> ElementCost:
    """Bytes per block entry: the reads (one set, refilled once staged), the float32 copies of the
    inputs (two sets on a GPU, so the next copy overlaps compute), the method's temporaries, and two
    output blocks (one being written while the next is cast). `method` None: a plain copy."""
    n = len(stored_bytes)
    host = float(sum(stored_bytes)) + 2 * out_bytes
    if method is None:
        work = float(max(stored_bytes))  # the staged copy in the stored dtype
    else:
        work = 4.0 * n * (2 if cuda else 1) + 4.0 * method.scratch(n)
    return ElementCost(host, work + (out_bytes if cuda else 0))


@dataclass(frozen=True)
class MemoryNeed:
    ram_bytes: int
    vram_bytes: int  # 0 on a CPU


def memory_needed(method: Method, n_inputs: int, largest_elements: int, *, budget: int | None,
                  stored_bytes: int = 2, out_bytes: int = 2, cuda: bool = False,
                  whole_tensor_sinks: bool = False) -> MemoryNeed:
    """RAM (and VRAM on a GPU) a merge needs at a budget: the base plus one block's working set, the
    block being the largest tensor or what the budget allows, whichever is smaller.

    `budget` None: the whole largest tensor at once (no budget). `whole_tensor_sinks`: a GGUF export
    in the same pass holds one whole output tensor.
    """
    cost = element_cost(method, [stored_bytes] * n_inputs, out_bytes, cuda)
    elements = largest_elements if budget is None else min(largest_elements, cost.block_elements(budget, cuda))
    extra = largest_elements * out_bytes if whole_tensor_sinks else 0
    if cuda:
        return MemoryNeed(BASE_RAM + int(elements * cost.host) + extra,
                          CUDA_CONTEXT + REDUCTION_BYTES + int(elements * cost.device))
    return MemoryNeed(BASE_RAM + REDUCTION_BYTES + int(elements * (cost.host + cost.device)) + extra, 0)
