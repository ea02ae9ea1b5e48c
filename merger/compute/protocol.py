"""Machine-readable progress lines: how a run elsewhere (a Hugging Face Job) reports to the app or CLI.

`python -m merger run ... --progress-lines` prints one `merger-event {json}` line per progress report
(throttled) and one `merger-result {json}` line at the end, on stdout; the follower parses the job's
log into the same Events as a local run. Everything else in the log is kept as plain log lines.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from ..pipeline import Event, RunResult

EVENT_PREFIX = "merger-event "
RESULT_PREFIX = "merger-result "
MIN_INTERVAL = 0.5  # seconds between two lines of one stage (a stage change or completion always prints)


class LinePrinter:
    """An EventCallback printing progress lines (stdout by default), flushed so a log follower sees them."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self._stage = ""
        self._last = 0.0

    def __call__(self, event: Event) -> None:
        now = time.monotonic()
        if event.stage == self._stage and event.fraction < 1 and now - self._last < MIN_INTERVAL:
            return
        self._stage, self._last = event.stage, now
        data = {"stage": event.stage, "fraction": round(event.fraction, 4), "message": event.message,
                "bytes_done": event.bytes_done, "bytes_total": event.bytes_total}
        self.stream.write(EVENT_PREFIX + json.dumps(data) + "\n")
        self.stream.flush()

    def data(self, data: dict[str, Any]) -> None:
        """The run's result line (any JSON object: a merge's files, an evaluation's scores)."""
        self.stream.write(RESULT_PREFIX + json.dumps(data) + "\n")
        self.stream.flush()

    def result(self, result: RunResult) -> None:
        folder = result.out_dir
        files = [[p.relative_to(folder).as_posix(), p.stat().st_size]
                 for p in sorted(folder.rglob("*")) if p.is_file()]
        data = {"pushed": list(result.pushed), "files": files, "seconds": round(result.seconds, 2),
                "warnings": list(result.warnings), "sanity": dict(result.sanity or {}),
                "quality": result.quality.markdown() if result.quality else [],
                "verdict": result.quality.verdict if result.quality else None}
        self.data(data)


def parse_line(line: str) -> Event | dict[str, Any] | None:
    """An Event, the result dict, or None for an ordinary log line (or a garbled progress line)."""
    text = line.strip()
    try:
        if text.startswith(EVENT_PREFIX):
            d = json.loads(text[len(EVENT_PREFIX):])
            return Event(str(d["stage"]), float(d["fraction"]), str(d["message"]), int(d.get("bytes_done", 0)),
                         int(d.get("bytes_total", 0)))
        if text.startswith(RESULT_PREFIX):
            d = json.loads(text[len(RESULT_PREFIX):])
            return d if isinstance(d, dict) else None
    except (ValueError, KeyError, TypeError):
        return None
    return None
