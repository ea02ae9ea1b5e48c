"""Is the merge any good? Perplexity of the merged model and of each parent on the shipped evaluation text,
a short greedy sample, and a loud verdict when the merge looks broken.

Cheap on purpose: a token budget bounds the cost (the plain torch forward of quantize.reference reads
one layer at a time, so memory stays one layer whatever the size). Perplexities are comparable across
tokenizers: every model scores the same text, and the summed negative log-likelihood is normalised by
the merged model's token count (for models sharing a tokenizer this is the ordinary perplexity).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ..errors import CancelledError, GGUFError
from .text import SOURCE, eval_sections

BROKEN_RATIO = 1.5  # merged perplexity above this multiple of the best parent's: "looks broken"
SAMPLE_MAX_PARAMS = 500_000_000  # greedy samples by the CPU reference forward (weights held in RAM) up to this
DEFAULT_TOKEN_BUDGET = 256


class _Tokenizer:
    """encode/decode of a model folder's tokenizer (tokenizer.json, else SentencePiece tokenizer.model)."""

    def __init__(self, folder: Path) -> None:
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            self.encode: Callable[[str], list[int]] = lambda text: tok.encode(text).ids
            self.decode: Callable[[list[int]], str] = lambda ids: tok.decode(ids)
        elif (folder / "tokenizer.model").is_file():
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            bos = sp.bos_id()
            self.encode = lambda text: ([bos] if bos >= 0 else []) + sp.encode(text)
            self.decode = lambda ids: sp.decode(ids)
        else:
            raise GGUFError(f"{folder.name} has no tokenizer.json or tokenizer.model")


@dataclass(frozen=True)
class ModelScore:
    name: str
    nll: float  # summed over the evaluation text
    n_tokens: int  # the model's own count of predicted tokens for that text
    sample: str | None  # greedy continuation of the first section's start (None: not computed)

    def perplexity(self, per_tokens: int) -> float:
        return math.exp(self.nll / per_tokens)


def _degenerate(text: str | None) -> bool:
    """Repeated or garbled text: one character or word making up half of it, or mostly unprintable."""
    if not text or len(text.strip()) < 4:
        return False
    bad = sum(1 for c in text if c == "\ufffd" or (not c.isprintable() and not c.isspace()))
    words = text.split()
    top_word = Counter(words).most_common(1)[0][1] if words else 0
    top_char = Counter(text.replace(" ", "")).most_common(1)[0][1]
    return bad > len(text) / 3 or (len(words) >= 4 and top_word >= len(words) / 2) or top_char >= len(text) / 2


@dataclass(frozen=True)
class QualityReport:
    merged: ModelScore
    parents: tuple[ModelScore, ...]
    n_tokens: int  # the merged model's count of predicted tokens: the perplexities' common denominator
    notes: tuple[str, ...] = ()

    def perplexity(self, score: ModelScore) -> float:
        return score.perplexity(self.n_tokens)

    @property
    def verdict(self) -> str | None:
        """'this merge looks broken: ...', or None when nothing looks wrong."""
        reasons = []
        if self.parents:
            best = min(self.parents, key=lambda s: s.nll)
            ratio = math.exp((self.merged.nll - best.nll) / self.n_tokens)
            if ratio > BROKEN_RATIO:
                reasons.append(f"its perplexity {self.perplexity(self.merged):.4g} is {ratio:.1f}x that of its best "
                               f"parent {best.name} ({self.perplexity(best):.4g})")
        sampled = [p for p in self.parents if p.sample is not None]
        if _degenerate(self.merged.sample) and not any(_degenerate(p.sample) for p in sampled):
            reasons.append(f"it writes repeated or garbled text ({self.merged.sample!r})"
                           + (" where its parents do not" if sampled else ""))
        return "this merge looks broken: " + "; ".join(reasons) if reasons else None

    def markdown(self) -> list[str]:
        """The card's table: merge vs each parent."""
        lines = ["| model | perplexity | sample |", "|---|---|---|"]
        for label, score in [("**this merge**", self.merged)] + [(p.name, p) for p in self.parents]:
            sample = "" if score.sample is None else repr(score.sample.strip()).replace("|", "\\|")
            lines.append(f"| {label} | {self.perplexity(score):.4g} | {sample} |")
        lines += ["", f"Perplexity over {self.n_tokens} tokens of {SOURCE}, lower is better (summed "
                      "log-likelihood normalised by this merge's token count, so parents with other tokenizers "
                      "compare fairly); greedy samples continue the start of its prose section."]
        verdict = self.verdict
        if verdict:
            lines = [f"> **Warning: {verdict}.**", ""] + lines
        return lines + [f"Note: {n}" for n in self.notes]


def _params(folder: Path) -> int:
    from ..sources import read_local_headers

    return sum(h.numel for h in read_local_headers(folder).values())


def _greedy(folder: Path, tok: _Tokenizer, prompt: list[int], n: int, device: str) -> str:
    from quantize.reference import cached_weights, reference_logits

    ids, weights = list(prompt), cached_weights(folder, device)
    for _ in range(n):
        ids.append(int(reference_logits(folder, ids, weights)[-1].argmax()))
    return tok.decode(ids[len(prompt):])


def _texts(tok: _Tokenizer, per_section: int) -> list[str]:
    """Each section cut (at a line end) to fit the token budget under the merged model's tokenizer."""
    out = []
    for _, text in eval_sections():
        lines = text.splitlines()
        while len(lines) > 1 and len(tok.encode("\n".join(lines))) > per_section:
            lines.pop()
        out.append("\n".join(lines))
    return out


def _score(name: str, folder: Path, texts: Sequence[str], sample_prompt: str | None, sample_tokens: int,
           cancel: Callable[[], bool], device: str) -> ModelScore:
    from quantize.reference import reference_logits

    tok = _Tokenizer(folder)
    nll, n_tokens = 0.0, 0
    for text in texts:
        if cancel():
            raise CancelledError("evaluation cancelled")
        ids = tok.encode(text)
        logp = torch.log_softmax(reference_logits(folder, ids, device=device).double(), -1)
        nll -= logp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).sum().item()
        n_tokens += len(ids) - 1
    sample = None
    if sample_prompt is not None:
        sample = _greedy(folder, tok, tok.encode(sample_prompt), sample_tokens, device)
    return ModelScore(name, nll, n_tokens, sample)


def evaluate_merge(merged: str | Path, parents: Mapping[str, str | Path], *,
                   token_budget: int = DEFAULT_TOKEN_BUDGET, sample_tokens: int = 12,
                   merged_sample: str | None = None, cancel: Callable[[], bool] | None = None,
                   progress: Callable[[str, float], None] | None = None, device: str = "cpu") -> QualityReport:
    """Score the merged folder and each parent folder on the evaluation text (forward passes on `device`).
    `merged_sample` is a sample already taken (from the GGUF in llama.cpp); without one, samples are drawn
    with the reference forward when the models are small enough for that to be quick (any size on a GPU)."""
    merged = Path(merged)
    cancel = cancel or (lambda: False)
    report = progress or (lambda message, fraction: None)
    tok = _Tokenizer(merged)
    texts = _texts(tok, max(8, token_budget // len(eval_sections())))
    n_tokens = sum(len(tok.encode(t)) - 1 for t in texts)
    small = device != "cpu" or _params(merged) <= SAMPLE_MAX_PARAMS
    prompt = " ".join(texts[0].split()[:6]) if small else None
    notes = [] if small or merged_sample else [
        f"no greedy samples: the CPU reference forward is slow above {SAMPLE_MAX_PARAMS / 1e9:.1f}B parameters "
        "(export a GGUF to get the merge's sample from llama.cpp)"]
    total = 1 + len(parents)
    report("perplexity of the merge", 0.0)
    score = _score("this merge", merged, texts, None if merged_sample else prompt, sample_tokens, cancel, device)
    if merged_sample is not None:
        score = ModelScore(score.name, score.nll, score.n_tokens, merged_sample)
    scores = []
    for i, (name, folder) in enumerate(parents.items(), start=1):
        report(f"perplexity of {name}", i / total)
        try:
            scores.append(_score(name, Path(folder), texts, prompt, sample_tokens, cancel, device))
        except GGUFError as exc:
            notes.append(f"{name} not scored: {exc}")
    report("evaluation done", 1.0)
    return QualityReport(score, tuple(scores), n_tokens, tuple(notes))
