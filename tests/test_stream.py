"""Parents streamed from the Hub by range requests (merger.remote, merger.streaming), against the local Hub.

Every claim is checked against the bytes of the files themselves (safetensors' own loader, or the
file bytes the server holds) and against the server's record of the byte ranges it sent.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merger import hub as hubmod
from merger import remote
from merger.__main__ import main
from merger.errors import CancelledError, HubError
from merger.pipeline import Event, RunOptions, run
from merger.recipe import parse_recipe
from merger.remote import RemoteTensorReader
from merger.sources import TensorReader, read_local_headers

TOKEN = "hf_alice_write"
TIES = """models:
  - model: acme/base
  - model: acme/chat
    parameters: {density: 0.5, weight: 0.5}
merge_method: ties
base_model: acme/base
dtype: float32
"""


@pytest.fixture
def pair(hub, llama_family):
    """acme/base (2 shards) and acme/chat on the local Hub, with their local folders."""
    from merger.app.tiny import make_tiny_model

    base = llama_family["base"]
    sharded = make_tiny_model(base.parent / "llama-base-2shards", "llama", seed=1, shards=2) \
        if not (base.parent / "llama-base-2shards").exists() else base.parent / "llama-base-2shards"
    hub.upload_folder(sharded, "acme/base")
    hub.upload_folder(llama_family["chat"], "acme/chat")
    hub.stats.ranges.clear()
    hub.stats.bytes_served.clear()
    return {"acme/base": sharded, "acme/chat": llama_family["chat"]}


def pinned_reader(repo: str, **kwargs) -> RemoteTensorReader:
    meta = hubmod.read_metadata(hubmod.resolve(repo))
    return RemoteTensorReader(repo, meta.model.sha, meta.headers, endpoint=hubmod.hub_endpoint(), **kwargs)


def weights_served(server, repo: str, folder: Path) -> list[tuple[int, int, str]]:
    """Byte ranges of tensor data (past each header) the server sent for `repo`, as (start, end, file)."""
    out = []
    for file in {h.file for h in read_local_headers(folder).values()}:
        raw = (folder / file).read_bytes()
        data_start = 8 + int.from_bytes(raw[:8], "little")
        out += [(a, b, file) for a, b in server.stats.ranges.get((repo, file), []) if b > data_start]
    return out


def safetensors_in_cache(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if p.name.endswith(".safetensors") or p.suffix == ".incomplete"]


def test_reads_equal_the_file_and_rows_are_one_contiguous_range(hub, pair) -> None:
    local = TensorReader(pair["acme/base"])
    with pinned_reader("acme/base") as reader:
        for name in local.headers:
            assert torch.equal(reader.read(name), local.read(name)), name
        name = "model.embed_tokens.weight"
        h = local.headers[name]
        hub.stats.ranges.clear()
        buf = torch.empty(h.nbytes, dtype=torch.uint8)
        rows = reader.read(name, rows=(3, 11), out=buf)
        assert torch.equal(rows, local.read(name)[3:11])
        assert rows.data_ptr() == buf.data_ptr()  # read into the caller's buffer
        row_bytes = h.nbytes // h.shape[0]
        assert hub.stats.ranges[("acme/base", h.file)] == [(h.begin + 3 * row_bytes, h.begin + 11 * row_bytes)]
    local.close()


def test_readahead_serves_every_byte_once_within_its_budget(hub, pair, tmp_path: Path) -> None:
    folder = pair["acme/base"]
    local = TensorReader(folder)
    names = list(local.headers)
    budget, piece = 32 * 1024, 8 * 1024
    with pinned_reader("acme/base", readahead_bytes=budget, piece_bytes=piece, connections=3) as reader:
        hub.stats.ranges.clear()
        reader.expect([(n, None) for n in names])
        for name in names:
            h = local.headers[name]
            if h.shape and h.shape[0] >= 4:  # the memory-budget engine reads big tensors as row chunks
                half = h.shape[0] // 2
                parts = [reader.read(name, rows=(0, half)), reader.read(name, rows=(half, h.shape[0]))]
                assert torch.equal(torch.cat(parts), local.read(name)), name
            else:
                assert torch.equal(reader.read(name), local.read(name)), name
        assert 0 < reader.peak_held <= budget + piece
        assert sum(h.nbytes for h in local.headers.values()) > 4 * budget  # so the budget did bound something
    served = weights_served(hub, "acme/base", folder)
    tensor_bytes = sum(h.nbytes for h in local.headers.values())
    assert sum(b - a for a, b, _ in served) == tensor_bytes  # each byte once: no re-reads, no whole files
    assert max(b - a for a, b, _ in served) <= piece
    assert safetensors_in_cache(tmp_path / "hf_home") == []
    local.close()


def test_reads_out_of_the_announced_order_are_still_exact(hub, pair) -> None:
    local = TensorReader(pair["acme/base"])
    names = list(local.headers)
    with pinned_reader("acme/base", readahead_bytes=32 * 1024, piece_bytes=8 * 1024) as reader:
        reader.expect([(n, None) for n in names])
        for name in [names[5], names[0], names[-1], names[1], names[5]]:
            assert torch.equal(reader.read(name), local.read(name)), name
    local.close()


def test_a_range_cut_mid_way_resumes_from_the_first_missing_byte(hub, pair) -> None:
    local = TensorReader(pair["acme/base"])
    name = "model.embed_tokens.weight"
    h = local.headers[name]
    with pinned_reader("acme/base") as reader:
        hub.inject("resolve_get", "drop", repo="acme/base", path=h.file, cut_after=1000, times=1)
        hub.stats.ranges.clear()
        assert torch.equal(reader.read(name), local.read(name))
        assert reader.stats.resumed == 1
    assert hub.stats.ranges[("acme/base", h.file)] == [(h.begin, h.begin + 1000), (h.begin + 1000, h.end)]
    local.close()


def test_server_errors_are_retried_and_a_lasting_failure_is_one_line(hub, pair, monkeypatch) -> None:
    monkeypatch.setattr(remote, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    local = TensorReader(pair["acme/base"])
    name = "model.norm.weight"
    with pinned_reader("acme/base") as reader:
        hub.inject("resolve_get", "server_error", repo="acme/base", times=3)
        assert torch.equal(reader.read(name), local.read(name))  # 3 failures, the 4th attempt succeeds
        hub.inject("resolve_get", "server_error", repo="acme/base", times=None)
        with pytest.raises(HubError) as err:
            reader.read(name)
        hub.clear_faults()
    assert "HTTP 500" in str(err.value) and "\n" not in str(err.value)
    local.close()


def test_a_reader_stays_on_its_commit_when_the_repo_changes(hub, pair) -> None:
    local = TensorReader(pair["acme/base"])
    name = "model.norm.weight"
    with pinned_reader("acme/base") as reader:
        h = local.headers[name]
        data = bytearray(hub.file_bytes("acme/base", h.file))
        data[h.begin:h.end] = bytes(h.nbytes)  # a new commit zeroes the tensor
        hub.commit_files("acme/base", {h.file: bytes(data)})
        assert torch.equal(reader.read(name), local.read(name))
        with pinned_reader("acme/base") as latest:
            assert not torch.equal(latest.read(name), local.read(name))
    local.close()


def test_streamed_run_equals_downloaded_run_and_caches_no_weights(hub, pair, tmp_path: Path) -> None:
    recipe = parse_recipe(TIES)
    home = tmp_path / "hf_home"
    streamed = run(recipe, RunOptions(out_dir=tmp_path / "streamed", device="cpu", stream=True))
    assert streamed.streamed and safetensors_in_cache(home) == []
    for repo, folder in pair.items():  # each tensor byte once, in ranges, never a whole shard
        tensor_bytes = sum(h.nbytes for h in read_local_headers(folder).values())
        assert sum(b - a for a, b, _ in weights_served(hub, repo, folder)) == tensor_bytes
    assert (tmp_path / "streamed" / "tokenizer.json").exists()
    downloaded = run(recipe, RunOptions(out_dir=tmp_path / "downloaded", device="cpu", stream=False))
    assert not downloaded.streamed and safetensors_in_cache(home)
    for f in ("model.safetensors", "config.json", "tokenizer.json", "mergekit_config.yml"):
        assert (tmp_path / "streamed" / f).read_bytes() == (tmp_path / "downloaded" / f).read_bytes(), f


def test_streamed_blocks_under_a_small_memory_budget_are_exact_and_parents_are_not_rescored(hub, pair, tmp_path) -> None:
    """--max-memory splits tensors into row blocks (some read more than once): the streamed reader serves
    them all, out of its announced order where needed, and the result is the downloaded run's, bit for bit.
    The evaluation scores the merge only and says that the streamed parents were not scored."""
    recipe = parse_recipe(TIES)
    budget = 64 * 1024
    streamed = run(recipe, RunOptions(out_dir=tmp_path / "streamed", device="cpu", stream=True, max_memory=budget))
    downloaded = run(recipe, RunOptions(out_dir=tmp_path / "downloaded", device="cpu", stream=False,
                                        max_memory=budget))
    assert (streamed.out_dir / "model.safetensors").read_bytes() == \
        (downloaded.out_dir / "model.safetensors").read_bytes()
    assert streamed.quality is not None and streamed.quality.parents == ()
    assert len(downloaded.quality.parents) == 2
    card = (streamed.out_dir / "README.md").read_text()
    assert "acme/base not scored: its weights were streamed" in card and "acme/chat not scored" in card


def test_a_space_streams_by_default_when_the_download_would_not_fit(hub, pair, tmp_path, monkeypatch) -> None:
    import merger.disk as disk
    from merger.errors import ModelError
    from merger.pipeline import check

    recipe = parse_recipe(TIES)
    estimates = check(recipe).estimates
    assert estimates.download_bytes > 0
    free = {"bytes": estimates.output_bytes + 1}  # room for the output, not for the parents as well
    monkeypatch.setattr(disk, "usage", lambda path: (1, free["bytes"]))
    with pytest.raises(ModelError, match="disk"):  # not on a Space: the download is not silently replaced
        run(recipe, RunOptions(out_dir=tmp_path / "here", device="cpu"))
    monkeypatch.setenv("SPACE_ID", "acme/merger")
    result = run(recipe, RunOptions(out_dir=tmp_path / "out", device="cpu", allow_local=False))
    assert result.streamed and safetensors_in_cache(tmp_path / "hf_home") == []
    with pytest.raises(ModelError, match="disk"):  # --no-stream on a Space: the download does not fit
        run(recipe, RunOptions(out_dir=tmp_path / "no", device="cpu", allow_local=False, stream=False))
    free["bytes"] = 10**15
    result = run(recipe, RunOptions(out_dir=tmp_path / "out2", device="cpu", allow_local=False))
    assert not result.streamed
    free["bytes"] = 1  # not even the output fits: streaming cannot help, the check says so
    with pytest.raises(ModelError, match="disk"):
        run(recipe, RunOptions(out_dir=tmp_path / "out3", device="cpu", allow_local=False))


def test_cli_stream_flag(hub, pair, tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "r.yml"
    recipe.write_text(TIES)
    assert main(["run", str(recipe), "--stream", "--no-eval", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert safetensors_in_cache(tmp_path / "hf_home") == []


def _wait_for_uploads(server, count: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while server.stats.requests["lfs_upload"] < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return server.stats.requests["lfs_upload"]


def test_shards_upload_during_the_merge_and_the_push_is_one_commit(hub, pair, tmp_path: Path) -> None:
    seen_during_merge: list[int] = []

    def progress(event: Event) -> None:
        if event.stage == "merge" and event.fraction > 0.9 and not seen_during_merge:
            seen_during_merge.append(_wait_for_uploads(hub, 1))  # shard 1 closed long ago: already uploaded?

    options = RunOptions(out_dir=tmp_path / "out", device="cpu", stream=True, token=TOKEN, push="alice/merged",
                         shard_size=100_000)
    result = run(parse_recipe(TIES), options, progress=progress)
    shards = sorted(p.name for p in result.out_dir.glob("*.safetensors"))
    assert len(shards) >= 4
    assert seen_during_merge and seen_during_merge[0] >= 1
    assert hub.stats.requests["lfs_upload"] == len(shards)  # each shard uploaded once, not again at the push
    assert hub.stats.requests["commit"] == 1
    assert set(shards) <= set(hub.repo_files("alice/merged"))
    for name in shards:
        assert hub.file_bytes("alice/merged", name) == (result.out_dir / name).read_bytes()
    pushed = {}
    for name in shards:
        pushed.update(load_file(result.out_dir / name))
    assert pushed.keys() == set(read_local_headers(result.out_dir))


def test_a_run_cancelled_after_early_uploads_leaves_no_repository(hub, pair, tmp_path: Path) -> None:
    cancel = threading.Event()

    def progress(event: Event) -> None:
        if event.stage == "merge" and event.fraction > 0.9 and not cancel.is_set():
            assert _wait_for_uploads(hub, 1) >= 1
            cancel.set()

    options = RunOptions(out_dir=tmp_path / "out", device="cpu", stream=True, token=TOKEN, push="alice/gone",
                         shard_size=100_000)
    with pytest.raises(CancelledError):
        run(parse_recipe(TIES), options, progress=progress, cancel=cancel)
    assert "alice/gone" not in hub.repos
    assert hub.stats.requests["commit"] == 0
    assert not (tmp_path / "out").exists()


def test_a_failed_early_upload_fails_the_run_and_leaves_no_repository(hub, pair, tmp_path: Path) -> None:
    hub.inject("lfs_upload", "forbidden", times=None)
    options = RunOptions(out_dir=tmp_path / "out", device="cpu", stream=True, token=TOKEN, push="alice/broken",
                         shard_size=100_000)
    with pytest.raises(HubError) as err:
        run(parse_recipe(TIES), options)
    assert "alice/broken" in str(err.value) and "\n" not in str(err.value) and TOKEN not in str(err.value)
    assert "alice/broken" not in hub.repos
    assert hub.stats.requests["commit"] == 0


@pytest.mark.parametrize("stream", [True, False])
def test_a_parent_changed_after_the_check_is_merged_at_the_checked_commit(hub, pair, tmp_path, stream) -> None:
    recipe = parse_recipe(TIES)
    reference = run(recipe, RunOptions(out_dir=tmp_path / "reference", device="cpu", stream=stream))
    file = "model.safetensors"
    original = hub.file_bytes("acme/chat", file)
    header = read_local_headers(pair["acme/chat"])["model.norm.weight"]
    changed = bytearray(original)
    changed[header.begin:header.end] = bytes(header.nbytes)

    def progress(event: Event) -> None:
        if event.stage == "check" and event.fraction == 1.0:
            hub.commit_files("acme/chat", {file: bytes(changed)}, message="a change during the run")

    result = run(recipe, RunOptions(out_dir=tmp_path / "out", device="cpu", stream=stream), progress=progress)
    assert hub.file_bytes("acme/chat", file) == bytes(changed)  # the repo did change mid-run
    assert (result.out_dir / file).read_bytes() == (reference.out_dir / file).read_bytes()
    hub.commit_files("acme/chat", {file: original})
