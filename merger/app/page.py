"""The page's behaviour that is not layout: styles that pass WCAG contrast, the editor's keyboard escape, the
check report that never describes another recipe than the one in the editor, and the notes under the
inputs. app.py wires these to components; everything here is plain functions of values.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import MergerError
from .results import alert, cell

# Colours are chosen for at least 4.5:1 against their background (WCAG 2.1 AA, normal text); the browser
# test measures them from computed styles. CodeMirror's YAML keys and gradio's placeholders/labels are
# lighter than that by default.
CSS = """
.merge-progress progress { width: 100%; height: 14px; }
.merge-progress-head { font-weight: 600; }
.merge-progress-msg { font-family: monospace; font-size: 0.85em; color: #374151; }
.merge-cancelled .merge-progress-head { color: #374151; }
.merge-failed .merge-progress-head { color: #991b1b; }
#recipe-status p, #hub-status p, #repo-note p, #run-note p { margin: 0; }
.msg { padding: 6px 10px; border-radius: 6px; border-left: 4px solid; margin: 2px 0; }
.msg p { margin: 0; }
.msg-error { color: #7f1d1d !important; background: #fef2f2; border-color: #b91c1c; }
.msg-stale { color: #713f12 !important; background: #fefce8; border-color: #a16207; }
.msg-ok { color: #14532d !important; background: #f0fdf4; border-color: #15803d; }
.msg-note { color: #1f2937 !important; background: #f3f4f6; border-color: #4b5563; }
.msg code { color: inherit; }
button#merge { background: #b93f0b; border-color: #9a3412; color: #ffffff; }
button#merge:hover { background: #9a3412; }
button#cancel { background: #ffffff; border: 1px solid #b91c1c; color: #991b1b; }
button#cancel:disabled { border-color: #9ca3af; color: #4b5563; background: #f3f4f6; }
input::placeholder, textarea::placeholder { color: #4b5563 !important; opacity: 1 !important; }
#editor .cm-content span { color: #1f2937; }
#editor .cm-content .tok-propertyName, #editor .cm-content .ͼl, #editor .cm-content .ͼm { color: #7c2d12; }
.report-table { overflow-x: auto; max-width: 100%; }
.report-table td, .report-table th { white-space: nowrap; }
#result th { white-space: nowrap; }
#hub-suggest, #model-suggest { margin-top: -6px; }
.msg * { color: inherit !important; }
/* Dark theme (gradio puts .dark on <body>): one selector per rule, as gradio mis-scopes ".dark a, .dark b". */
.dark .msg-error { color: #fecaca !important; background: #450a0a; border-color: #f87171; }
.dark .msg-stale { color: #fef08a !important; background: #422006; border-color: #eab308; }
.dark .msg-ok { color: #bbf7d0 !important; background: #052e16; border-color: #22c55e; }
.dark .msg-note { color: #e5e7eb !important; background: #1f2937; border-color: #9ca3af; }
.dark .merge-progress-msg { color: #d1d5db; }
.dark .merge-cancelled .merge-progress-head { color: #d1d5db; }
.dark .merge-failed .merge-progress-head { color: #fca5a5; }
.dark button#cancel { background: #1f2937; border-color: #f87171; color: #fecaca; }
.dark button#cancel:disabled { border-color: #6b7280; color: #d1d5db; background: #374151; }
.dark input::placeholder { color: #9ca3af !important; }
.dark textarea::placeholder { color: #9ca3af !important; }
.dark #editor .cm-content span { color: #e5e7eb; }
.dark #editor .cm-content .tok-propertyName { color: #fdba74; }
"""

# Tab and Shift+Tab leave the YAML editor (CodeMirror would indent instead, trapping keyboard users);
# Ctrl+] and Ctrl+[ indent and outdent. Runs once when the page loads (app.load with js only).
EDITOR_KEYS_JS = """
() => {
  if (window.__mergerKeys) return;
  window.__mergerKeys = true;
  const stops = () => Array.from(document.querySelectorAll(
      'a[href], button, input, select, textarea, [tabindex]:not([tabindex="-1"])')).filter(
      (el) => !el.disabled && el.tabIndex >= 0 && el.getClientRects().length > 0 && !el.closest('#editor'));
  document.addEventListener('keydown', (e) => {
    const editor = e.target && e.target.closest ? e.target.closest('#editor') : null;
    if (e.key === 'Tab' && editor && e.target.closest('.cm-content') && !e.ctrlKey && !e.altKey && !e.metaKey) {
      e.preventDefault();
      e.stopPropagation();
      const all = stops();
      const after = (el) => editor.compareDocumentPosition(el) & Node.DOCUMENT_POSITION_FOLLOWING;
      const next = e.shiftKey ? all.filter((el) => !after(el)).pop() : all.find(after);
      if (next) next.focus();
    }
    if (e.key === 'Enter' && e.target.closest && e.target.closest('#method')) {
      window.__mergerRefocus = e.target;  // gradio's dropdown blurs itself after a choice: keep the focus there
    }
  }, true);
  document.addEventListener('focusout', (e) => {
    const input = window.__mergerRefocus;
    if (input && e.target === input) {
      window.__mergerRefocus = null;
      setTimeout(() => { if (document.activeElement === document.body) input.focus(); }, 0);
    }
  }, true);
}
"""
EDITOR_KEYS_NOTE = ("Keyboard: **Tab** moves on to the next field; indent a line with **Ctrl+]**, outdent with "
                    "**Ctrl+[** (Enter keeps the indentation).")


def error(e: BaseException) -> str:
    """A user's mistake (or a bug, without internals) as one styled, announced line."""
    from .demo import render_error

    return alert(cell(render_error(e)))


def status_box(line: str) -> str:
    """The line under the editor, styled as an error when it is one."""
    return alert(line) if line.startswith("✗") else alert(line, "ok")


# ---------------------------------------------------------------- the check report and the Merge gate

def checked(text: str, ok: bool, report_md: str) -> dict[str, Any]:
    """What the page remembers of the last Check: the exact recipe text, its verdict and its report."""
    return {"text": text, "ok": ok, "report": report_md}


def report_for(text: str, last: dict[str, Any] | None) -> str:
    """The report panel for the recipe now in the editor: the last report when it is of this very text,
    else that report marked stale (it is of another recipe), or nothing before any check."""
    if not last:
        return ""
    if last["text"] == text:
        return last["report"]
    earlier = re.sub(r"^### Check: .*$", "### Earlier check (of the recipe before your edits)", last["report"],
                     count=1, flags=re.MULTILINE)
    return alert("⚠ **Stale**: the recipe changed after this check, so this report describes an earlier "
                 "version. Press **Check** again.", "stale") + "\n\n" + earlier


def merge_gate(text: str, last: dict[str, Any] | None) -> str | None:
    """Why Merge must not start this recipe (its last Check failed), or None. A recipe that was never checked
    (or changed since) starts, and the report says that the job checks it first."""
    if last and last["text"] == text and not last["ok"]:
        return ("the Check of this recipe found errors (see the report): fix them, or edit the recipe and press "
                "Check again, before merging")
    return None


def unchecked_note(text: str, last: dict[str, Any] | None) -> str | None:
    """The report's line when Merge starts a recipe that was not checked as it is now."""
    if last and last["text"] == text:
        return None
    return alert("ℹ This recipe was not checked as it is now: the merge checks it first and stops at the first "
                 "error, before downloading anything.", "note")


# ---------------------------------------------------------------- notes under the inputs

def repo_note(name: str, text: str, *, publish: bool, gguf_repo: bool, quants: list[str] | None) -> str:
    """What the output will really be called: the folder name (the rewriting is shown, not silent) and,
    when publishing, the Hub repos; an invalid Hub name is an error here, before any work."""
    from .demo import _short_name, default_repo_name

    typed = (name or "").strip()
    effective = typed or default_repo_name(text)
    folder = _short_name(effective)
    notes = []
    if not typed:
        notes.append(f"No name given: `{effective}` is used.")
    shown_last = effective.split("/")[-1]
    if folder != shown_last:
        notes.append(f"Saved as folder `{folder}` (names keep only letters, digits, `-`, `_` and `.`).")
    if publish:
        from ..hub import validate_repo_id

        try:
            if "/" in effective:
                validate_repo_id(effective)
            elif folder != effective:
                raise MergerError(f"'{effective}' is not a valid Hub repo name; use letters, digits, - _ . "
                                  f"(for example '{folder}')")
        except MergerError as e:
            return error(e)
        target = effective if "/" in effective else f"YOUR-NAME/{effective}"
        notes.append(f"Published as `{target}`"
                     + (f", GGUF files in `{target}-GGUF`." if gguf_repo and quants else "."))
    return alert(" ".join(notes), "note") if notes else ""
