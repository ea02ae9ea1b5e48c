"""Concurrent users against the served app (issue 7), small enough for CI: bench/load.py with 6 users.

The full run (20 users) and its figures are in bench/RESULTS.md; this one asserts the same properties:
every check and merge completes, users that waited were shown their queue position, nobody sees
another user's markers in any streamed update or file, and the server's memory stays bounded.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench import load

USERS = 6


@pytest.fixture(scope="module")
def report() -> load.LoadReport:
    started = time.monotonic()
    # each merge held for 0.5 s: on any machine the six simultaneous merges then queue behind each other
    result = load.run_load(USERS, timeout=50, gguf_every=3, bounded_after=2, pace=0.5)
    assert time.monotonic() - started < 60, "the load test must stay bounded in time"
    print(load.format_report(result))
    return result


def test_every_user_completes(report: load.LoadReport) -> None:
    assert report.errors() == []
    assert report.completed("check") == report.completed("merge") == USERS
    assert len(report.job_folders) == USERS


def test_waiting_users_were_shown_their_position(report: load.LoadReport) -> None:
    merges = [u.merge for u in report.users]
    waited = [m for m in merges if m.ranks or m.queued_without_rank]
    assert len(waited) >= USERS // 2  # one merge at a time: most of six simultaneous merges wait
    assert all(m.ranks for m in waited)
    assert max(r for m in waited for r in m.ranks) >= 2
    assert not any(m.position_went_up for m in merges)


def test_no_cross_talk(report: load.LoadReport) -> None:
    for user in report.users:
        assert user.marker in user.check.outputs[-1][0]  # the report shows the user's own model folders
        assert user.out_dir is not None and user.out_dir.name == f"load-{user.marker}"
    assert len({u.out_dir.parent for u in report.users}) == USERS
    # progress was streamed (a merge quicker than one update interval sends only its result) and audited
    assert sum(len(u.merge.outputs) for u in report.users) > USERS


def test_memory_stays_bounded(report: load.LoadReport) -> None:
    mb = 1024
    assert report.k == 2 and report.peak_rss_at_k_kb > report.idle_rss_kb
    assert report.peak_rss_kb - report.peak_rss_at_k_kb < 48 * mb
    assert report.end_rss_kb < report.idle_rss_kb + 256 * mb


def test_audit_detects_cross_talk(tmp_path: Path) -> None:
    """The audit itself: another user's marker in a streamed update or a wrong folder is reported."""
    out = tmp_path / "job1" / "load-lt001kaaaaaa"
    out.mkdir(parents=True)
    user = load.User(1, "lt001kaaaaaa", "slerp", [], "recipe")
    (out / "mergekit_config.yml").write_text("recipe")
    user.check.outputs = [("### Check: ✓ **OK**: models /x/lt001kaaaaaa-base", "✓")]
    done = '<div data-status="done">'
    result = f"Files in `{out}`:\n\n| file | size |\n|---|---|\n| `mergekit_config.yml` | 6 B |"
    user.merge.outputs = [(done, "merge: /x/lt002kbbbbbb-base", "", ""), (done, "done in 1 s", result, "# load-lt001kaaaaaa")]
    load.audit(user)
    assert user.problems == ["merge output shows other users' markers ['lt002kbbbbbb']"]
    user.problems.clear()
    user.merge.outputs = [(done, "done in 1 s", result.replace("load-lt001", "load-lt003"), "# load-lt001kaaaaaa")]
    (tmp_path / "job1" / "load-lt003kaaaaaa").mkdir()
    load.audit(user)
    assert user.problems[0] == "merge output shows other users' markers ['lt003kaaaaaa']"
    assert "output folder load-lt003kaaaaaa is not load-lt001kaaaaaa" in user.problems


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(10, 0, -1)]  # 10 .. 1, unsorted on purpose
    assert (load.percentile(values, 50), load.percentile(values, 95), load.percentile(values, 100)) == (5, 10, 10)
    assert load.percentile([3.0], 95) == 3.0
