"""A skip hides a claim: every skipped or xfailed test (or module) fails the run, unless a reviewer put it on
ALLOWED_SKIPS below with the reason it may skip. A missing reference (mergekit, llama.cpp, transformers,
the converter) is an error, never a skip.

The hooks are imported by tests/conftest.py, so `make test`, `.ci/run` and any pytest run apply them.
"""

from __future__ import annotations

import pytest

# test node id (without parameters) -> why it may skip. Keep this short and reviewed.
ALLOWED_SKIPS: dict[str, str] = {
    "tests/test_app.py::test_gallery_matches_the_shared_examples":
        "compares the gallery with shared/recipes, which sits beside the main checkout only (not beside "
        "extra git worktrees); CI has it",
}


def _allowed(nodeid: str) -> bool:
    return nodeid.split("[", 1)[0] in ALLOWED_SKIPS


def _refuse(report: pytest.TestReport | pytest.CollectReport) -> None:
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if hasattr(report, "wasxfail"):
        reason = f"xfail: {report.wasxfail}"
    report.outcome = "failed"
    report.longrepr = (f"{report.nodeid} was skipped ({reason}); a skip hides a claim: install what it needs "
                       "(make test does) or fix it; only tests/no_skips.py ALLOWED_SKIPS may skip")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not _allowed(item.nodeid):
        _refuse(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # noqa: ANN201
    """A module-level importorskip skips a whole file at collection: that fails too."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not _allowed(report.nodeid):
        _refuse(report)
