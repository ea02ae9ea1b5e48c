"""Tensors read straight from the Hub by HTTP range requests: parents are streamed, never downloaded.

`RemoteTensorReader` has the interface of `sources.TensorReader` (`read(name, rows=None, out=None)`,
`close()`) over the safetensors shards of one model pinned to a commit sha, so a parent cannot change
during a run. Each read is a byte range of one shard (a row range of dim 0 is a contiguous range too).
Given the order in which tensors will be read (the merge plan's), it reads ahead: a few connections
fetch the next pieces while the current tensor merges, within a byte budget, so reading, merging and
writing overlap. Nothing of the weights touches the disk or the Hugging Face cache.

Why not `HfFileSystem`: its buffered files fetch a whole block per request and retry a cut response
from the block's start, its streaming files cannot seek and retry once, and both hand back new
bytes objects. Here every range is written into a caller's buffer and a response cut mid-way is
resumed from the first byte not yet received. The requests themselves are huggingface_hub's:
`hf_hub_url` at the pinned sha, `build_hf_headers` (token, user agent), `get_session` (its client,
which follows the Hub's redirects to the CDN).
"""

from __future__ import annotations

import bisect
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import httpx2
import torch
from huggingface_hub import hf_hub_url
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from .errors import CancelledError, HubError, MergerError, ModelError
from .sources import TORCH_DTYPES, TensorHeader

PIECE_BYTES = 16 * 1024 * 1024  # one range request of the read-ahead
READAHEAD_BYTES = 256 * 1024 * 1024  # fetched but not yet consumed, per model
CONNECTIONS = 4  # concurrent range requests per model
RETRY_DELAYS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)  # waits after failures that made no progress

Rows = tuple[int, int] | None


def byte_span(header: TensorHeader, rows: Rows = None) -> tuple[int, int]:
    """[begin, end) in its shard of a tensor, or of rows [start, stop) of its dim 0."""
    if rows is None:
        return header.begin, header.end
    start, stop = rows
    count = header.shape[0] if header.shape else 0
    if not (0 <= start <= stop <= count):
        raise ModelError(f"rows {start}:{stop} are outside {header.name}, which has {count} rows")
    row_bytes = header.nbytes // count if count else 0
    return header.begin + start * row_bytes, header.begin + stop * row_bytes


@dataclass
class RangeStats:
    """What the reader did on the wire (tests and the benchmark read these)."""

    requests: int = 0
    resumed: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, requests: int = 0, resumed: int = 0, nbytes: int = 0) -> None:
        with self.lock:
            self.requests += requests
            self.resumed += resumed
            self.bytes += nbytes


def fetch_range(url: str, start: int, view: memoryview, *, token: str | None, what: str,
                stats: RangeStats | None = None, cancelled: Callable[[], bool] = lambda: False,
                delays: Sequence[float] | None = None) -> None:
    """Fill `view` with the bytes of `url` from `start` on, resuming where a cut response stopped.

    A failure that delivered bytes is resumed at once from the first missing byte (a fresh set of
    delays); one that delivered nothing is retried after the next delay, and reported when they run out.
    """
    delays = RETRY_DELAYS if delays is None else delays
    filled = [0]
    budget = list(delays)
    while filled[0] < len(view):
        if cancelled():
            raise CancelledError("the merge was cancelled")
        before = filled[0]
        if before and stats:
            stats.add(resumed=1)
        try:
            _one_request(url, start, view, filled, token)
        except MergerError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below: resume, retry or report
            if filled[0] > before:
                budget = list(delays)
            elif not _retryable(e) or not budget:
                raise _error(e, what) from None
            else:
                time.sleep(budget.pop(0))
        finally:
            if stats:
                stats.add(requests=1, nbytes=filled[0] - before)


def _one_request(url: str, start: int, view: memoryview, filled: list[int], token: str | None) -> None:
    """One GET of the bytes of `view` not filled yet; `filled[0]` counts those received, as they arrive."""
    first, last = start + filled[0], start + len(view) - 1
    headers = build_hf_headers(token=token or False)
    headers["Range"] = f"bytes={first}-{last}"
    headers["Accept-Encoding"] = "identity"
    with get_session().stream("GET", url, headers=headers) as response:
        hf_raise_for_status(response)
        skip = 0
        if response.status_code == 200:  # the server ignored Range: drop what comes before our bytes
            skip = first
        elif response.status_code != 206:
            raise HubError(f"unexpected HTTP {response.status_code} to a range request for {url}")
        elif not response.headers.get("Content-Range", "").startswith(f"bytes {first}-"):
            raise HubError(f"the Hub answered range {response.headers.get('Content-Range')!r} to bytes={first}-{last}")
        for chunk in response.iter_raw():
            if skip:
                dropped = min(skip, len(chunk))
                chunk, skip = chunk[dropped:], skip - dropped
            done = filled[0]
            n = min(len(chunk), len(view) - done)
            view[done:done + n] = chunk[:n]
            filled[0] = done + n
            if filled[0] == len(view):
                return
    raise httpx2.RemoteProtocolError("the response ended before the requested range")


def _retryable(e: BaseException) -> bool:
    if isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError)):
        return True
    status = getattr(getattr(e, "response", None), "status_code", None)
    return status == 429 or (status is not None and status >= 500)


def _error(e: BaseException, what: str) -> HubError:
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        return HubError(f"the Hub refused to stream {what} (HTTP {status}); sign in with a token that can read it")
    if status == 404:
        return HubError(f"{what} is no longer on the Hub at the pinned commit (HTTP 404)")
    if status is not None:
        return HubError(f"streaming {what} failed with HTTP {status} after retries; retry later")
    return HubError(f"streaming {what} failed ({type(e).__name__}) after retries; check the connection and retry")


@dataclass
class _Piece:
    """One range of the read-ahead: fetched by a worker, consumed by reads in order, then dropped."""

    file: str
    begin: int
    end: int
    scheduled: bool = False
    counted: bool = False  # its bytes count against the read-ahead budget
    dropped: bool = False
    consumed: int = 0
    data: torch.Tensor | None = None
    error: BaseException | None = None
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def size(self) -> int:
        return self.end - self.begin


class RemoteTensorReader:
    """Reads tensors of a Hub model, pinned to `sha`, by range requests; reads ahead in `expect`ed order.

    `headers` are the model's safetensors headers (absolute offsets in each shard, as
    `hub.read_metadata` returns them). Thread-safe; `read` may be called from any thread.
    """

    def __init__(self, repo_id: str, sha: str, headers: dict[str, TensorHeader], *, token: str | None = None,
                 endpoint: str | None = None, readahead_bytes: int = READAHEAD_BYTES,
                 piece_bytes: int = PIECE_BYTES, connections: int = CONNECTIONS,
                 cancelled: Callable[[], bool] = lambda: False) -> None:
        self.repo_id, self.sha, self.headers, self.token = repo_id, sha, headers, token
        self.endpoint = endpoint
        self.readahead_bytes, self.piece_bytes = readahead_bytes, max(1, piece_bytes)
        self.stats = RangeStats()
        self.peak_held = 0  # the most bytes the read-ahead held at once (for tests and the benchmark)
        self._cancelled = cancelled
        self._pool = ThreadPoolExecutor(max(1, connections), thread_name_prefix="stream")
        self._lock = threading.Lock()
        self._pieces: list[_Piece] = []
        self._next: dict[str, list[tuple[int, int]]] = {}  # file -> sorted (next byte wanted, piece index)
        self._cursor = 0  # pieces before it are consumed or skipped
        self._frontier = 0  # pieces before it have been scheduled (or passed over)
        self._held = 0
        self._closed = False

    # ------------------------------------------------------------ the TensorReader interface

    def read(self, name: str, rows: Rows = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor (or rows [start, stop) of its dim 0) in its stored dtype, on the CPU.

        `out`, a flat uint8 buffer of at least the tensor's size, is filled and returned viewed as the
        tensor; else a new tensor.
        """
        try:
            h = self.headers[name]
        except KeyError:
            raise ModelError(f"{self.repo_id} has no tensor {name}") from None
        begin, end = byte_span(h, rows)
        nbytes = end - begin
        shape = list(h.shape)
        if rows is not None:
            shape[0] = rows[1] - rows[0]
        buf = out[:nbytes] if out is not None and out.numel() >= nbytes else torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self._fill(h.file, begin, memoryview(buf.numpy()))
        return buf.view(TORCH_DTYPES[h.dtype]).reshape(shape)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for piece in self._pieces[self._cursor:]:
                self._drop(piece)
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._pieces, self._next = [], {}

    def __enter__(self) -> "RemoteTensorReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ read-ahead

    def expect(self, order: Iterable[tuple[str, Rows]]) -> None:
        """Announce the reads to come, in order (repeats allowed); read-ahead starts at once.

        Reads that do not follow the announced order are still served, by direct range requests.
        """
        with self._lock:
            for name, rows in order:
                h = self.headers.get(name)
                if h is None:
                    continue
                begin, end = byte_span(h, rows)
                for start in range(begin, end, self.piece_bytes):
                    self._next.setdefault(h.file, []).append((start, len(self._pieces)))
                    self._pieces.append(_Piece(h.file, start, min(end, start + self.piece_bytes)))
            for keys in self._next.values():
                keys.sort()
            self._schedule()

    def _schedule(self, urgent: int | None = None) -> None:
        """Start fetching pieces in order within the budget (and piece `urgent` regardless). Lock held."""
        if self._closed:
            return
        if urgent is not None and not self._pieces[urgent].scheduled:
            self._start(self._pieces[urgent])
        self._frontier = max(self._frontier, self._cursor)
        while self._frontier < len(self._pieces):
            piece = self._pieces[self._frontier]
            if not piece.scheduled and not piece.dropped:
                if self._held and self._held + piece.size > self.readahead_bytes:
                    break
                self._start(piece)
            self._frontier += 1

    def _start(self, piece: _Piece) -> None:
        piece.scheduled = piece.counted = True
        self._held += piece.size
        self.peak_held = max(self.peak_held, self._held)
        self._pool.submit(self._fetch_piece, piece)

    def _fetch_piece(self, piece: _Piece) -> None:
        data, error = None, None
        try:
            if not piece.dropped:
                data = torch.empty(piece.size, dtype=torch.uint8)
                self._get(piece.file, piece.begin, memoryview(data.numpy()))
        except BaseException as e:  # noqa: BLE001 - handed to the read that waits for this piece
            error = e
        with self._lock:
            if piece.dropped:
                self._uncount(piece)
            else:
                piece.data, piece.error = data, error
            piece.ready.set()

    def _uncount(self, piece: _Piece) -> None:
        if piece.counted:
            piece.counted = False
            self._held -= piece.size

    def _drop(self, piece: _Piece) -> None:
        """A piece nobody will read any more: free its buffer now, or when its fetch ends. Lock held."""
        if piece.dropped:
            return
        piece.dropped = True
        piece.data = None
        if piece.ready.is_set() or not piece.scheduled:
            self._uncount(piece)

    def _find(self, file: str, pos: int) -> int | None:
        """The first piece at or after the cursor whose next wanted byte is `pos` of `file`. Lock held."""
        keys = self._next.get(file)
        if not keys:
            return None
        i = bisect.bisect_left(keys, (pos, self._cursor))
        return keys[i][1] if i < len(keys) and keys[i][0] == pos else None

    def _fill(self, file: str, begin: int, view: memoryview) -> None:
        """Fill `view` with bytes [begin, begin + len(view)) of `file`, from read-ahead pieces if planned."""
        pos, done = begin, 0
        while done < len(view):
            with self._lock:
                index = self._find(file, pos)
                if index is not None:
                    piece = self._pieces[index]
                    for skipped in self._pieces[self._cursor:index]:  # the reads moved past them
                        self._drop(skipped)
                    self._cursor = index
                    self._schedule(urgent=index)
            if index is None:  # not announced (or out of order): one direct request for the rest
                self._get(file, pos, view[done:])
                return
            piece.ready.wait()
            with self._lock:
                if piece.error is not None:
                    raise piece.error
                data = piece.data
            if data is None:  # dropped meanwhile by a read in another thread that moved past it
                self._get(file, pos, view[done:])
                return
            offset = pos - piece.begin
            n = min(piece.size - offset, len(view) - done)
            view[done:done + n] = memoryview(data.numpy())[offset:offset + n]
            done += n
            pos += n
            with self._lock:
                if piece.dropped:
                    continue
                keys = self._next[file]
                keys.remove((piece.begin + piece.consumed, index))
                piece.consumed = offset + n
                if piece.consumed < piece.size:  # rows of a piece: the rest is found at its next byte
                    bisect.insort(keys, (pos, index))
                else:
                    self._drop(piece)
                    self._cursor = max(self._cursor, index + 1)
                    self._schedule()

    def _get(self, file: str, start: int, view: memoryview) -> None:
        url = hf_hub_url(self.repo_id, file, revision=self.sha, endpoint=self.endpoint)
        fetch_range(url, start, view, token=self.token, what=f"{self.repo_id}/{file}@{self.sha[:10]}",
                    stats=self.stats, cancelled=self._cancelled)
