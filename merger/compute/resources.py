"""What a run needs (RAM, disk, GPU memory, bytes moved) and how long it should take on given hardware.

`needs_from_report` is the one place that turns the check's estimates (RAM and VRAM at the merge's
memory budget, see merger.budget) into requirements for the backends. The speeds below
are planning figures, not measurements on Hugging Face hardware: they size a job's timeout (with a
wide margin) and give the user an order of magnitude for time and cost before anything starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..check import CheckReport

GB = 1_000_000_000
BASE_RAM = 3 * GB  # Python, torch and the tokenizer files: what a run holds besides its tensors
DISK_MARGIN = 1.10  # filesystems and partial files: plan 10% more disk than the bytes written
START_SECONDS = 120.0  # a job's start: pulling the image, mounting volumes
READ_BPS = 200e6  # reading a parent (a mounted volume or a download)
GPU_MERGE_BPS = 2e9  # input bytes merged per second on a GPU: the reads dominate
CPU_MERGE_BPS_PER_CORE = 20e6  # input bytes merged per second per CPU core (mergekit here: 15 TIES, 37 linear)
WRITE_BPS = 300e6  # writing the output to local disk
GGUF_BPS_PER_CORE = 15e6  # F16 bytes quantized per second per core (llama.cpp, K-quants)
UPLOAD_BPS = 100e6  # pushing the result to the Hub
# Forward passes over a model's weights for a 256-token budget (evaluation, GGUF verification): bench/verify.py
# measured 220 s per GB on a 2-core CPU under load (~2.3 MB/s per core), 3-4x faster idle; on a GPU the
# weights are moved to it layer by layer, so the transfer dominates.
FORWARD_BPS_PER_CORE = 5e6
FORWARD_GPU_BPS = 1e9


@dataclass(frozen=True)
class Needs:
    """What one run needs from a machine; bytes moved drive the time estimate."""

    ram_bytes: int
    disk_bytes: int  # local disk for the output and the GGUF files (parents excluded: see `parents_on_disk`)
    gpu_bytes: int  # GPU memory for the merge's working set (0 when the run would need none)
    read_bytes: int  # parents read once
    output_bytes: int
    gguf_bytes: int
    parents_on_disk: int  # extra disk when the parents are downloaded rather than mounted or streamed
    forward_bytes: int = 0  # weights run through a forward pass: evaluation (merge + parents), GGUF verification


def needs_from_report(report: CheckReport, *, evaluate: bool = True) -> Needs:
    """The check's estimates as requirements: RAM and GPU memory at the check's memory budget; the forward
    passes of the evaluation (unless `evaluate` is off) and of the GGUF verification."""
    e = report.estimates
    if e is None:
        from ..errors import ModelError

        raise ModelError("the check could not estimate this merge's size; fix the problems it reports first")
    return Needs(ram_bytes=BASE_RAM + max(e.merge_ram_bytes, e.gguf_ram_bytes),
                 disk_bytes=int((e.output_bytes + e.gguf_bytes) * DISK_MARGIN),
                 gpu_bytes=e.merge_vram_bytes or e.merge_ram_bytes, read_bytes=e.download_bytes,
                 output_bytes=e.output_bytes, gguf_bytes=e.gguf_bytes, parents_on_disk=e.download_bytes,
                 forward_bytes=(e.output_bytes + e.download_bytes if evaluate else 0)
                 + (e.output_bytes + e.gguf_bytes if e.gguf_bytes else 0))


def merge_seconds(needs: Needs, *, cores: int, gpu: bool) -> float:
    """The merge itself: reading the parents, merging, writing the output (no start-up, no GGUF, no push)."""
    merge_rate = GPU_MERGE_BPS if gpu else CPU_MERGE_BPS_PER_CORE * max(cores, 1)
    return needs.read_bytes / min(READ_BPS, merge_rate) + needs.output_bytes / WRITE_BPS


def forward_seconds(needs: Needs, *, cores: int, gpu: bool) -> float:
    """The evaluation's and the GGUF verification's forward passes."""
    return needs.forward_bytes / (FORWARD_GPU_BPS if gpu else FORWARD_BPS_PER_CORE * max(cores, 1))


def run_seconds(needs: Needs, *, cores: int, gpu: bool, start: float = START_SECONDS) -> float:
    """A whole job: start, merge, GGUF quantization, evaluation and verification, upload."""
    gguf = needs.gguf_bytes / (GGUF_BPS_PER_CORE * max(cores, 1)) if needs.gguf_bytes else 0.0
    upload = (needs.output_bytes + needs.gguf_bytes) / UPLOAD_BPS
    return start + merge_seconds(needs, cores=cores, gpu=gpu) + gguf + forward_seconds(needs, cores=cores, gpu=gpu) \
        + upload


def timeout_seconds(estimate: float) -> int:
    """A job's time limit: three times the estimate plus 15 minutes, in whole minutes."""
    return int(math.ceil((3 * estimate + 900) / 60) * 60)
