"""The app's "Quantize a model" mode (what gguf-my-repo does): one model straight to verified GGUF files, no merge.

Download (or read the local folder), export with llama.cpp, measure every file against the model (quantize.verify),
write a card with the `llama-cli --hf-repo` lines, and optionally publish the files to `OWNER/NAME-GGUF`. It runs
as a runs.Run task, so it has the merge's progress panel, log, Cancel and cleanup.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import CancelledError, GGUFError, RecipeError
from ..pipeline import Event, EventCallback, RunResult
from ..recipe import ModelRef, parse_model_ref


@dataclass(frozen=True)
class QuantizeRequest:
    model: ModelRef
    quants: tuple[str, ...]
    out_dir: Path  # inside the job's folder
    push: str | None  # the GGUF repo, `owner/NAME-GGUF`
    private: bool
    token: str | None


def gguf_repo_name(model: str, owner: str | None) -> str:
    """`OWNER/NAME-GGUF` for a model `org/NAME` (gguf-my-repo's convention); without an owner, `NAME-GGUF`."""
    name = model.split("@")[0].rstrip("/").split("/")[-1]
    return f"{owner}/{name}-GGUF" if owner else f"{name}-GGUF"


def quantize_request(model_text: str, quants: Sequence[str], *, job_dir: Path, allow_local: bool, publish: bool,
                     repo: str, private: bool, token: str | None) -> QuantizeRequest:
    """Everything checked before the job takes its place in the queue (one-line errors)."""
    from .demo import GGUF_CHOICES, publish_target
    from .hubsearch import hub_ref

    text = (model_text or "").strip()
    if not text or "://" in text or text.startswith(("huggingface.co/", "hf.co/")):
        text = hub_ref(text, "the model to quantize")
    ref = parse_model_ref(text, "the model to quantize", allow_local=allow_local)
    if not quants:
        raise RecipeError("tick at least one GGUF type to make")
    unknown = [q for q in quants if q not in GGUF_CHOICES]
    if unknown:
        raise RecipeError(f"unknown GGUF type(s) {', '.join(unknown)}; choose from {', '.join(GGUF_CHOICES)}")
    push = None
    if publish:
        if not token:
            raise RecipeError("publishing needs you to sign in with Hugging Face (locally: set HF_TOKEN)")
        from ..hub import validate_repo_id

        push = publish_target((repo or "").strip() or gguf_repo_name(ref.repo, None), token)
        validate_repo_id(push)
    name = (push or gguf_repo_name(ref.repo, None)).split("/")[-1]
    return QuantizeRequest(ref, tuple(quants), job_dir / name, push, private, token)


def run_quantize(request: QuantizeRequest, progress: EventCallback, cancel: threading.Event) -> RunResult:
    """Download, export, verify, card, push; returns what the result panel shows."""
    from quantize.llama import export_gguf, fallback_notice
    from quantize.verify import Verifier

    from ..eval.text import eval_sections

    started = time.monotonic()
    stop = cancel.is_set
    ref = request.model
    if ref.local:
        folder = Path(ref.repo)
    else:
        from .. import hub

        def on_bytes(done: int, total: int | None) -> None:
            if cancel.is_set():
                raise CancelledError("the job was cancelled; nothing was written")
            progress(Event("download", done / total if total else 0.0, str(ref), done, total or 0))

        _, folder = hub.fetch_model(ref, token=request.token, progress=on_bytes)
    progress(Event("download", 1.0, "the model is available locally"))
    out = request.out_dir
    out.mkdir(parents=True, exist_ok=False)
    quants = [q for q in request.quants if q != "F16"]
    outtype = "f16" if "F16" in request.quants or not quants else None
    verifier = Verifier(folder, eval_sections(), token_budget=256, cancel=stop)
    measurements: list = []

    def verify(path: Path, kind: str) -> None:
        progress(Event("verify", len(measurements) / (len(request.quants) + 1), f"measuring {path.name} in llama.cpp"))
        m = verifier.quantized(path, kind) if measurements else verifier.base(path, kind)
        measurements.append(m)
        if not m.passed:
            raise GGUFError(f"verification failed: {m.reason}")

    name = out.name[:-len("-GGUF")] if out.name.endswith("-GGUF") else out.name
    progress(Event("gguf", 0.0, f"exporting {ref} with llama.cpp"))
    paths = export_gguf(folder, out, name, outtype, quants, cancel=stop, verify=verify)
    progress(Event("verify", 1.0, "GGUF files verified"))
    kept = [p for p in paths if p.is_file()]
    warnings = [n for n in (fallback_notice(p, q) for p in kept for q in quants if p.name.endswith(f"{q}.gguf")) if n]
    (out / "README.md").write_text(gguf_card(str(ref) if not ref.local else name, request.push or f"{name}-GGUF",
                                              kept, folder), encoding="utf-8")
    pushed: list[str] = []
    if request.push:
        if cancel.is_set():
            raise CancelledError("the job was cancelled before publishing")
        from ..hub import push_folder

        def on_upload(done: int, total: int | None) -> None:
            progress(Event("upload", done / total if total else 0.0, request.push, done, total or 0))

        result = push_folder(out, request.push, token=request.token, private=request.private, gguf_files=kept,
                             gguf_repo=request.push, progress=on_upload, commit_message="Upload GGUF files")
        pushed = [result.repo_url]
    return RunResult(out, sorted(p.name for p in out.iterdir()), None, warnings, kept, pushed,  # type: ignore[arg-type]
                     time.monotonic() - started, {m.file: m.summary() for m in measurements})


def gguf_card(source: str, repo: str, files: Sequence[Path], folder: Path) -> str:
    """The GGUF repo's README: where the files come from (its licence carried over), the files, and how to run
    them (`llama-cli --hf-repo ... --hf-file ...`, as gguf-my-repo's cards do)."""
    from huggingface_hub import ModelCard, ModelCardData

    from ..card import TOOL_TAG, GGUFFileInfo, _gguf_table, _gguf_usage

    readme = folder / "README.md"
    license_ = ModelCard.load(readme).data.license if readme.is_file() else None
    data = ModelCardData(base_model=source if "/" in source else None, license=license_ or "unknown",
                         library_name="gguf", pipeline_tag="text-generation", tags=["gguf", "llama.cpp", TOOL_TAG])
    if "/" in source:
        data.base_model_relation = "quantized"
    infos = [GGUFFileInfo.from_path(p) for p in files]
    link = f"[{source}](https://huggingface.co/{source})" if "/" in source else f"`{source}`"
    body = [f"# {repo.split('/')[-1]}", "", f"GGUF files of {link} for llama.cpp and compatible runtimes, made with "
            "llama.cpp and each measured against the original model (KL divergence, top-1 agreement).", "",
            "## Files", "", *_gguf_table(infos, repo), "", "## Usage", "", *_gguf_usage(infos, repo)]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)
