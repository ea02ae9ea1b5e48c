"""What a job shows while it runs and once it ended: the progress panel, the log, the result with verdicts and links.

Plain functions of a runs.Snapshot, so every state can be tested without a browser. A cancelled or failed
job never shows a progress bar (a full bar reads as success); a failure's message is shown once, in the
result, styled as an error.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .runs import CANCELLED, DONE, FAILED, STAGES, Snapshot

_SAMPLE = re.compile(r"; sample: (.*)$")


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def cell(text: Any) -> str:
    """Text safe inside one Markdown table cell."""
    return html.escape(str(text)).replace("|", "\\|").replace("\n", " ")


def alert(text: str, kind: str = "error") -> str:
    """A message box: `error` (role=alert, announced at once), `stale`, `ok` or `note` (role=status)."""
    role = "alert" if kind == "error" else "status"
    return f'<div class="msg msg-{kind}" role="{role}">\n\n{text}\n\n</div>'


def render_progress(snap: Snapshot) -> str:
    """The progress panel: stage k of n, a bar, bytes and ETA, and the latest message. A job that ended other
    than done has no bar: its state and what happened to its files."""
    stage = snap.stage
    if snap.status == CANCELLED:
        return (f'<div class="merge-progress merge-cancelled" data-status="{CANCELLED}" data-stage="{html.escape(stage)}"'
                f' data-fraction="{snap.fraction:.3f}" role="status"><div class="merge-progress-head">■ Cancelled'
                f'</div><div class="merge-progress-msg">{html.escape(snap.message)}</div></div>')
    if snap.status == FAILED:
        return (f'<div class="merge-progress merge-failed" data-status="{FAILED}" data-stage="{html.escape(stage)}"'
                f' data-fraction="{snap.fraction:.3f}"><div class="merge-progress-head">✗ Failed: the reason is '
                'under the log; nothing was kept</div></div>')
    if stage in STAGES:
        head = f"Step {STAGES.index(stage) + 1}/{len(STAGES)}: {stage}, {snap.fraction:.0%}"
    else:
        head = {"queued": "Waiting for its turn in the queue", "done": "Done"}.get(stage, stage)
    extra = []
    if snap.bytes_total:
        extra.append(f"{human_bytes(snap.bytes_done)} / {human_bytes(snap.bytes_total)}")
    if snap.eta_seconds is not None:
        extra.append(f"about {human_seconds(snap.eta_seconds)} left")
    line = " · ".join([head, *extra])
    link = (f'<div class="merge-progress-job">Hugging Face Job: <a href="{html.escape(snap.url)}" target="_blank">'
            f'{html.escape(snap.url)}</a></div>' if snap.url else "")
    return (f'<div class="merge-progress" data-status="{snap.status}" data-stage="{html.escape(stage)}" '
            f'data-fraction="{snap.fraction:.3f}"><div class="merge-progress-head">{html.escape(line)}</div>'
            f'<progress max="1" value="{snap.fraction:.3f}" aria-label="progress of this step"></progress>'
            f'<div class="merge-progress-msg">{html.escape(snap.message)}</div>{link}</div>')


def render_log(snap: Snapshot) -> str:
    return "\n".join(snap.log)


def download_link(path: Path) -> str:
    """A link the page serves (gradio's file route; the outputs folder is one of its static paths)."""
    return f"gradio_api/file={quote(str(path))}"


def _sanity_rows(sanity: dict[str, str]) -> list[str]:
    """One row per GGUF file: the verdict first, the figures, the greedy sample quoted as code."""
    rows = ["| file | verdict | measured | sample (greedy, tiny models write gibberish) |", "|---|---|---|---|"]
    for name, summary in sanity.items():
        verdict, _, rest = summary.partition(": ")
        m = _SAMPLE.search(rest)
        sample = m.group(1).strip("'\"") if m else ""
        figures = rest[:m.start()] if m else rest
        shown = sample[:60] + ("…" if len(sample) > 60 else "")
        rows.append(f"| `{cell(name)}` | **{cell(verdict)}** | {cell(figures)} | "
                    + (f"<code>{cell(shown)}</code>" if shown else "-") + " |")
    return rows


def render_outcome(snap: Snapshot, done: str = "Merged") -> str:
    """The result panel: a verdict, Hub links, download links with sizes, the GGUF verdicts, warnings."""
    if snap.status == CANCELLED:
        return "Cancelled: nothing was kept."
    if snap.status == FAILED:
        return alert(f"✗ {cell(snap.error)}")
    o = snap.outcome
    if o is None or snap.status != DONE:
        return ""
    lines = [f"### ✓ {done} in {o.seconds:.1f} s", ""]
    if o.verdict:
        lines = [f"### ⚠ {done} in {o.seconds:.1f} s, but {o.verdict}", ""]
    for url in o.pushed:
        label = "GGUF files on the Hub" if url.rstrip("/").endswith("-GGUF") else "Model on the Hub"
        lines.append(f"- **{label}**: [{url}]({url})")
    if o.pushed:
        lines.append("")
    if o.out_dir is not None:
        lines.append(f"Files in `{o.out_dir}` (click to download):")
    lines += ["", "| file | size |", "|---|---|"]
    for name, size in o.files:
        shown = f"[{cell(name)}]({download_link(o.out_dir / name)})" if o.out_dir is not None else f"`{cell(name)}`"
        lines.append(f"| {shown} | {human_bytes(size)} |")
    notices = [w for w in o.warnings if w != o.verdict]
    if notices:
        lines += ["", *[f"- ⚠ {cell(w)}" for w in notices]]
    if o.sanity:
        lines += ["", "**GGUF verification** in llama.cpp (KL divergence and top-1 agreement against the "
                      "reference, perplexity, a greedy sample)", "", *_sanity_rows(o.sanity)]
    if o.quality:
        lines += ["", "**Evaluation**: the merge against its parents", "",
                  *_quality_rows([line for line in o.quality if not line.startswith("> **Warning")])]
    return "\n".join(lines)


_QUALITY_ROW = re.compile(r"^\| (?P<head>.*?) \| (?P<ppl>[^|]*) \| (?P<sample>.*) \|$")


def _quality_rows(table: list[str]) -> list[str]:
    """The evaluation table (merger.eval.quality) for the page: its samples quoted as code, shortened,
    under a header that says what they are (a tiny model's greedy text is gibberish, not a failure)."""
    out = []
    for line in table:
        if line == "| model | perplexity | sample |":
            out.append("| model | perplexity | sample (greedy, tiny models write gibberish) |")
            continue
        m = _QUALITY_ROW.match(line)
        if m is None or line.startswith("|---") or not m.group("sample"):
            out.append(line)
            continue
        sample = m.group("sample")
        shown = sample[:60] + ("…" if len(sample) > 60 else "")
        out.append(f"| {m.group('head')} | {m.group('ppl')} | <code>{html.escape(shown)}</code> |")
    return out


def card_markdown(card: str) -> str:
    """A model card for display: its YAML front matter as a code block, then the card body."""
    m = re.match(r"^---\n(.*?)\n---\n?", card, re.DOTALL)
    if not m:
        return card
    return f"```yaml\n{m.group(1)}\n```\n\n{card[m.end():]}"
