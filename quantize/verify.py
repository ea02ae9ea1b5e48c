"""GGUF verification with teeth: every file measured the way llama.cpp's perplexity tool does it
(`--kl-divergence`), at a cost bounded by a token budget rather than by the model's size.

- The unquantized file (F16/BF16/F32) is compared with the merged safetensors through the plain torch
  reference forward (quantize.reference), where that forward knows the architecture.
- Each quantized file is compared with the unquantized GGUF: mean KL divergence of the next-token
  distributions and top-1 agreement ("same top p"), over the shipped evaluation text.
- A file passes when its mean KLD and top-1 agreement are within the thresholds of its type. They are
  derived from llama.cpp's own measurements of its converter + quantizer (tools/perplexity/README.md of
  the pinned llama.cpp, LLaMA 3 8B, no imatrix): 4x llama.cpp's mean KLD, and its top-1 agreement minus
  10 points (a short text is noisier than wikitext). The tests check that llama.cpp's own files for the
  same tiny model pass them, and that ours are as close to the reference as llama.cpp's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from merger.errors import GGUFError

# llama.cpp's measured mean KLD against the BF16 model, and top-1 agreement where it reports it.
LLAMA_CPP_KLD: dict[str, float] = {
    "F16": 0.000551, "Q8_0": 0.001355, "Q6_K": 0.005452, "Q5_K_M": 0.010762, "Q5_K_S": 0.016595,
    "Q5_1": 0.018045, "Q5_0": 0.022239, "Q4_K_M": 0.031273, "Q4_K_S": 0.043136, "Q4_1": 0.071683,
    "Q4_0": 0.071940, "Q3_K_L": 0.087176, "Q3_K_M": 0.101913, "Q3_K_S": 0.228217, "Q2_K": 0.445132,
}
LLAMA_CPP_TOP1: dict[str, float] = {"Q8_0": 0.97674, "Q6_K": 0.96031, "Q4_K_M": 0.91901, "Q2_K": 0.71138}
KLD_MARGIN = 4.0
TOP1_MARGIN = 0.10
DEFAULT_TOKEN_BUDGET = 256
# Top-1 agreement means something only where the reference is confident: on near-uniform distributions
# (a tiny random model) ties flip under any rounding. It is part of the verdict when the reference's mean
# top-1 probability reaches this (real models are far above it; a random tiny model is near 1/vocab).
CONFIDENT_TOP_P = 0.2


@dataclass(frozen=True)
class Threshold:
    max_kld: float
    min_top1: float


def _top1_for(kld: float) -> float:
    """llama.cpp's top-1 agreement at this KLD, interpolated in log(KLD) between its reported points."""
    points = sorted((LLAMA_CPP_KLD[t], top1) for t, top1 in LLAMA_CPP_TOP1.items())
    if kld <= points[0][0]:
        return points[0][1]
    for (k0, p0), (k1, p1) in zip(points, points[1:]):
        if kld <= k1:
            f = (math.log(kld) - math.log(k0)) / (math.log(k1) - math.log(k0))
            return p0 + f * (p1 - p0)
    return points[-1][1]


def threshold(gguf_type: str) -> Threshold:
    """The pass mark of a file of this type (F32 against the safetensors must be near exact)."""
    kind = gguf_type.upper()
    if kind == "F32":
        return Threshold(1e-4, 0.98)
    kld = LLAMA_CPP_KLD["F16" if kind == "BF16" else kind]
    return Threshold(KLD_MARGIN * kld, _top1_for(kld) - TOP1_MARGIN)


@dataclass(frozen=True)
class Measurement:
    """One GGUF file against its reference, with the verdict."""

    file: str
    gguf_type: str
    reference: str  # what it was compared with
    n_tokens: int
    kld_mean: float | None  # None when no reference could be computed (see `note`)
    kld_p99: float | None
    top1: float | None
    reference_top_p: float | None  # mean top-1 probability of the reference: top-1 counts when confident
    perplexity: float
    reference_perplexity: float | None
    threshold: Threshold
    sample: str
    seconds: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.kld_mean is None or (self.kld_mean <= self.threshold.max_kld
                                         and (not self.top1_counts or (self.top1 or 0.0) >= self.threshold.min_top1))

    @property
    def top1_counts(self) -> bool:
        return (self.reference_top_p or 0.0) >= CONFIDENT_TOP_P

    @property
    def reason(self) -> str | None:
        """One line saying why the file failed, or None."""
        if self.passed:
            return None
        return (f"{self.file} is too far from {self.reference}: mean KL divergence {self.kld_mean:.4g} "
                f"(limit {self.threshold.max_kld:.3g} for {self.gguf_type}), top-1 agreement "
                f"{100 * (self.top1 or 0):.1f}% (at least {100 * self.threshold.min_top1:.1f}%)")

    def summary(self) -> str:
        """The card's and the app's one-line account of this file."""
        verdict = "✓ pass" if self.passed else "✗ FAIL"
        if self.kld_mean is None:
            figures = f"loads in llama.cpp; {self.note}"
        else:
            mark = (f"≥ {100 * self.threshold.min_top1:.1f}%" if self.top1_counts
                    else "not judged: the reference is not confident")
            figures = (f"vs {self.reference}: mean KLD {self.kld_mean:.2e} (≤ {self.threshold.max_kld:.1e}), "
                       f"top-1 {100 * (self.top1 or 0):.1f}% ({mark})")
        return (f"{verdict}: {figures}; perplexity {self.perplexity:.2f} over {self.n_tokens} tokens; "
                f"sample: {self.sample.strip()!r}")


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), -1)


def compare(ref_logp: torch.Tensor, got_logp: torch.Tensor) -> tuple[float, float, float, float]:
    """(mean KLD, 99th percentile KLD, top-1 agreement, mean top-1 probability of the reference) of two (tokens, vocab) log-probability tables:
    KL(P_ref || P_got) per token, as llama.cpp's perplexity tool computes it."""
    if ref_logp.shape != got_logp.shape:
        raise GGUFError(f"logits of shape {tuple(got_logp.shape)} cannot be compared with {tuple(ref_logp.shape)}")
    kld = (ref_logp.exp() * (ref_logp - got_logp)).sum(-1)
    top1 = (ref_logp.argmax(-1) == got_logp.argmax(-1)).double().mean().item()
    return kld.mean().item(), torch.quantile(kld, 0.99).item(), top1, ref_logp.max(-1).values.exp().mean().item()


def _nll(logp: torch.Tensor, ids: Sequence[int]) -> float:
    """Summed negative log-likelihood of ids[1:] given the prefix."""
    return -logp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).sum().item()


class Verifier:
    """Measures the unquantized GGUF once (keeping its log-probabilities), then each quantized file
    against it. Call `base` first, then `quantized` for each file, while the base file still exists."""

    def __init__(self, model_dir: str | Path, sections: Sequence[tuple[str, str]], *,
                 token_budget: int = DEFAULT_TOKEN_BUDGET, sample_tokens: int = 16,
                 cancel: Callable[[], bool] | None = None, device: str = "cpu") -> None:
        if not sections:
            raise GGUFError("the verification text is empty")
        self.model_dir = Path(model_dir)
        self.sections = list(sections)
        self.per_section = max(8, token_budget // len(self.sections))
        self.sample_tokens = sample_tokens
        self.cancel = cancel or (lambda: False)
        self.device = device  # of the torch reference forward (llama.cpp uses the GPU when built with CUDA)
        self._ids: list[list[int]] | None = None
        self._base_logp: list[torch.Tensor] | None = None
        self._base_name = ""

    def _load(self, path: Path):  # noqa: ANN202 - llama_cpp.Llama
        from quantize.llama import load_gguf

        return load_gguf(path, n_ctx=self.per_section + self.sample_tokens + 16)

    def _run(self, path: Path) -> tuple[list[torch.Tensor], str]:
        """Log-probabilities of each section's tokens, and a greedy sample from the first section's start."""
        llm = self._load(path)
        try:
            if self._ids is None:
                self._ids = [llm.tokenize(text.encode("utf-8"), add_bos=True)[: self.per_section]
                             for _, text in self.sections]
                if min(len(ids) for ids in self._ids) < 2:
                    raise GGUFError("a section of the verification text gives fewer than 2 tokens")
            out = []
            for ids in self._ids:
                if self.cancel():
                    from merger.errors import CancelledError

                    raise CancelledError("GGUF verification cancelled")
                llm.reset()
                llm.eval(ids)
                out.append(_log_probs(torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))))
            llm.reset()
            prompt = self._ids[0][: min(8, len(self._ids[0]))]
            tokens = []
            for token in llm.generate(prompt, temp=0.0, top_k=1):
                if token == llm.token_eos() or len(tokens) >= self.sample_tokens:
                    break
                tokens.append(token)
            return out, llm.detokenize(tokens).decode("utf-8", errors="replace")
        finally:
            llm.close()

    def _perplexity(self, logps: Sequence[torch.Tensor]) -> float:
        assert self._ids is not None
        nll = sum(_nll(lp, ids) for lp, ids in zip(logps, self._ids))
        return math.exp(nll / sum(len(ids) - 1 for ids in self._ids))

    def _measure(self, path: Path, gguf_type: str, reference: str, ref: list[torch.Tensor] | None,
                 got: list[torch.Tensor], sample: str, start: float, note: str = "") -> Measurement:
        assert self._ids is not None
        n = sum(len(ids) for ids in self._ids)
        kld = p99 = top1 = top_p = None
        if ref is not None:
            kld, p99, top1, top_p = compare(torch.cat(ref), torch.cat(got))
        return Measurement(path.name, gguf_type.upper(), reference, n, kld, p99, top1, top_p, self._perplexity(got),
                           self._perplexity(ref) if ref is not None else None, threshold(gguf_type), sample,
                           time.perf_counter() - start, note)

    def base(self, path: str | Path, gguf_type: str) -> Measurement:
        """The unquantized file against the merged safetensors (its log-probabilities are kept)."""
        from quantize.reference import reference_logits

        start, path = time.perf_counter(), Path(path)
        got, sample = self._run(path)
        self._base_logp, self._base_name = got, path.name
        assert self._ids is not None
        try:
            ref = [_log_probs(reference_logits(self.model_dir, ids, device=self.device)) for ids in self._ids]
        except GGUFError as exc:
            return self._measure(path, gguf_type, "safetensors model", None, got, sample, start,
                                 note=f"not compared with the merged model ({exc})")
        return self._measure(path, gguf_type, "safetensors model", ref, got, sample, start)

    def quantized(self, path: str | Path, quant: str) -> Measurement:
        """A quantized file against the unquantized GGUF measured by `base`."""
        if self._base_logp is None:
            raise GGUFError("verify the unquantized GGUF before the quantized files")
        start, path = time.perf_counter(), Path(path)
        got, sample = self._run(path)
        return self._measure(path, quant, self._base_name, self._base_logp, got, sample, start)
