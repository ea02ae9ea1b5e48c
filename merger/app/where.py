"""Where the app runs a merge: "here" (this machine, or its ZeroGPU windows) or on Hugging Face Jobs.

The choice is the user's; the check shows what each costs (a Job's flavor, time and dollars; whether a
ZeroGPU window can hold the merge) before anything starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from ..check import CheckReport
from ..compute import Backend, Here
from ..compute import zerogpu
from ..errors import MergerError
from ..pipeline import RunOptions
from ..recipe import Recipe

HERE, JOBS = "here", "jobs"


def choices(environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(label, value) pairs for the "Where" radio."""
    here = "Run here (ZeroGPU)" if zerogpu.available(environ) else "Run here"
    return [(here, HERE), ("Run on Hugging Face Jobs (your account, billed per minute)", JOBS)]


def prepare() -> None:
    """What must happen when the app starts (on ZeroGPU: declaring the GPU function)."""
    zerogpu.prepare()


def zerogpu_quota(token: str | None) -> int:
    """The user's daily ZeroGPU seconds: PRO (asked of the Hub) or free; MERGER_ZEROGPU_QUOTA overrides."""
    if os.environ.get("MERGER_ZEROGPU_QUOTA", "").isdigit():
        return int(os.environ["MERGER_ZEROGPU_QUOTA"])
    if token:
        from huggingface_hub import HfApi

        from ..hub import hub_endpoint

        try:
            if HfApi(endpoint=hub_endpoint()).whoami(token=token).get("isPro"):
                return zerogpu.DAILY_QUOTA["pro"]
        except Exception:  # unknown: assume the free quota; the window is refused, never overrun
            pass
    return zerogpu.DAILY_QUOTA["free"]


def backend(where: str, *, token: str | None, environ: Mapping[str, str] | None = None) -> Backend:
    """The backend for this choice; "here" on a ZeroGPU Space is the ZeroGPU backend."""
    if where == JOBS:
        from ..compute.jobs import Jobs

        return Jobs()
    if zerogpu.available(environ):
        return zerogpu.ZeroGPU(quota_seconds=zerogpu_quota(token))
    return Here()


def plan_markdown(where: str, recipe: Recipe, report: CheckReport, *, token: str | None,
                  quants: tuple[str, ...], environ: Mapping[str, str] | None = None) -> str:
    """What the chosen place would do with this merge, as a few Markdown lines (empty when nothing to add)."""
    if not report.ok:
        return ""
    try:
        if where == JOBS:
            from ..compute.jobs import plan_job

            plan = plan_job(recipe, RunOptions(out_dir=Path("."), token=token, gguf=quants), report=report)
            head, *rest = plan.lines()
            return "\n".join([f"**{head}**", ""] + [f"- {line.strip()}" for line in rest])
        if zerogpu.available(environ):
            from ..compute.resources import needs_from_report

            needs = needs_from_report(report)
            seconds = zerogpu.window_seconds(needs)
            why = zerogpu.refusal(needs, seconds, quota=zerogpu_quota(token))
            return f"✗ {why}" if why else f"ZeroGPU: the merge gets a GPU window of about {seconds} s."
    except MergerError as e:
        return f"✗ {e}"
    return ""
