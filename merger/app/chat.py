"""Chat with a merge: its GGUF file run by llama.cpp (llama-cpp-python) with the model's own chat template,
streamed token by token; bounded context and time per reply, one reply at a time per user.

A model stays loaded per user session (the few most recent sessions only), so a conversation does not
reload it for every message. The file is a local GGUF (a merge just made here) or the smallest
quantized GGUF of a Hub repository (a published merge), downloaded with the user's token.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import MergerError

PREFERRED = ("Q4_K_M", "Q5_K_M", "Q4_K_S", "Q6_K", "Q8_0")  # what people chat with, in order


@dataclass(frozen=True)
class ChatLimits:
    n_ctx: int = 2048  # tokens of context (prompt + reply)
    max_tokens: int = 256  # tokens per reply
    seconds: float = 60.0  # wall time per reply
    sessions: int = 4  # models kept loaded, most recently used first
    temperature: float = 0.7


def pick_gguf(files: list[str]) -> str | None:
    """The file to chat with among a repo's files: a preferred quantization, else the smallest-named one;
    never a split part other than the first."""
    ggufs = [f for f in files if f.endswith(".gguf") and (not re.search(r"-\d{5}-of-\d{5}\.gguf$", f)
                                                         or "-00001-of-" in f)]
    for kind in PREFERRED:
        for f in ggufs:
            if kind in f.upper():
                return f
    return sorted(ggufs)[0] if ggufs else None


def resolve_gguf(source: str, *, token: str | None = None) -> Path:
    """A local .gguf path, or `owner/name` of a Hub repo whose GGUF is downloaded (cached)."""
    path = Path(source).expanduser()
    if source.endswith(".gguf") or "\\" in source or source.startswith(("/", ".", "~")):
        if not path.is_file():
            raise MergerError(f"{source}: no such GGUF file")
        return path
    from ..hub import download_file, repo_files, validate_repo_id

    validate_repo_id(source)
    name = pick_gguf(repo_files(source, token=token))
    if name is None:
        raise MergerError(f"{source} has no GGUF file to chat with; publish one with --gguf Q4_K_M")
    return download_file(source, name, token=token)


class ChatSessions:
    """Loaded models per session and the one-reply-at-a-time rule."""

    def __init__(self, limits: ChatLimits = ChatLimits()) -> None:
        self.limits = limits
        self._models: OrderedDict[str, tuple[Path, object]] = OrderedDict()
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def _model(self, session: str, path: Path):  # noqa: ANN202 - llama_cpp.Llama
        with self._lock:
            held = self._models.pop(session, None)
            if held is not None and held[0] == path:
                self._models[session] = held
                return held[1]
            if held is not None:
                held[1].close()
        from quantize.llama import _llama_cpp

        llama_cpp = _llama_cpp()
        try:
            llm = llama_cpp.Llama(str(path), n_ctx=self.limits.n_ctx, verbose=False,
                                  n_gpu_layers=-1 if llama_cpp.llama_supports_gpu_offload() else 0)
        except ValueError as exc:
            raise MergerError(f"llama.cpp cannot load {path.name}: {exc}") from None
        with self._lock:
            self._models[session] = (path, llm)
            while len(self._models) > self.limits.sessions:
                _, (_, old) = self._models.popitem(last=False)
                old.close()
        return llm

    def _fit(self, llm, messages: list[dict]) -> list[dict]:  # noqa: ANN001
        """Drop the oldest turns until the conversation leaves room for a whole reply."""
        budget = self.limits.n_ctx - self.limits.max_tokens - 16

        def size(ms: list[dict]) -> int:
            return sum(len(llm.tokenize(m["content"].encode("utf-8"), add_bos=False)) + 8 for m in ms)

        kept = list(messages)
        while len(kept) > 1 and size(kept) > budget:
            kept.pop(0)
        if size(kept) > budget:
            raise MergerError(f"the message is too long for a {self.limits.n_ctx}-token context; shorten it")
        return kept

    def reply(self, session: str, gguf: Path, history: list[dict], message: str) -> Iterator[str]:
        """Stream the growing reply to `message` after `history` ([{role, content}, ...])."""
        if not message.strip():
            raise MergerError("type a message first")
        with self._lock:
            if session in self._busy:
                raise MergerError("a reply is still being written; wait for it to finish")
            self._busy.add(session)
        try:
            llm = self._model(session, Path(gguf))
            messages = self._fit(llm, [*history, {"role": "user", "content": message}])
            text, started = "", time.monotonic()
            stream = llm.create_chat_completion(messages=messages, max_tokens=self.limits.max_tokens, stream=True,
                                                temperature=self.limits.temperature)
            for chunk in stream:
                text += chunk["choices"][0]["delta"].get("content", "")
                if time.monotonic() - started > self.limits.seconds:
                    yield text + f" [stopped: {self.limits.seconds:.0f} s limit]"
                    return
                yield text
        finally:
            with self._lock:
                self._busy.discard(session)

    def close(self) -> None:
        with self._lock:
            for _, llm in self._models.values():
                llm.close()
            self._models.clear()
