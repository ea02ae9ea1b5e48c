"""merger.hub against the local Hub server, through the real huggingface_hub client."""

from __future__ import annotations

import errno
import json
import logging
import socket
import struct
from pathlib import Path

import pytest

from merger import hub as mhub
from merger import hub_errors
from merger.card import RECIPE_FILE, ParentInfo, build_card
from merger.errors import HubError, ModelError
from merger.recipe import parse_recipe
from merger.sources import read_local_headers
from merger.app.tiny import make_tiny_model
from tests.hubserver import HubServer

WRITE, READ, BOB = "hf_alice_write", "hf_alice_read", "hf_bob_write"
SHARD1 = "model-00001-of-00002.safetensors"


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_errors, "RETRY_DELAYS", (0.0, 0.0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hubmodels")
    base = make_tiny_model(root / "base", "llama", seed=3, num_layers=2, shards=2)
    chat = make_tiny_model(root / "chat", perturb_from=base, seed=4, perturb_scale=0.05)
    return {"base": base, "chat": chat}


@pytest.fixture
def published(hub: HubServer, tiny: dict[str, Path]) -> str:
    """acme/tiny-llama: a sharded tiny model plus files a merge must never download."""
    hub.upload_folder(tiny["base"], "acme/tiny-llama")
    sha = hub.commit_files("acme/tiny-llama", {"pytorch_model.bin": b"\0pickle" * 100, "model-Q4_K_M.gguf": b"GGUF" * 50,
                                          "consolidated.safetensors": b"\0" * 300, "README.md": b"# tiny\n"})
    hub.stats.__init__()
    return sha


def expected_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file()}


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and text
    return text


# ---------------------------------------------------------------- resolve, metadata, download

def test_resolve_pins_branch_and_older_commits(hub: HubServer, published: str) -> None:
    newer = hub.commit_files("acme/tiny-llama", {"notes.txt": b"v2"})
    head = mhub.resolve("acme/tiny-llama")
    assert head.sha == newer and head.requested is None
    assert mhub.resolve("acme/tiny-llama@main").sha == newer
    old = mhub.resolve(f"acme/tiny-llama@{published[:12]}")
    assert old.sha == published and "notes.txt" not in old.files and "notes.txt" in head.files
    assert head.files[SHARD1] == len(hub.file_bytes("acme/tiny-llama", SHARD1))
    assert head.access == "public" and not head.gated
    assert head.parent_info() == ParentInfo("acme/tiny-llama", newer, None)


def test_metadata_reads_only_header_bytes(hub: HubServer, published: str, tiny: dict[str, Path]) -> None:
    meta = mhub.read_metadata(mhub.resolve("acme/tiny-llama"))
    assert meta.headers == read_local_headers(tiny["base"])
    assert meta.config == json.loads((tiny["base"] / "config.json").read_text())
    assert meta.weight_files == ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    for shard in meta.weight_files:
        data = hub.file_bytes("acme/tiny-llama", shard)
        header_end = 8 + struct.unpack("<Q", data[:8])[0]
        ranges = hub.stats.ranges[("acme/tiny-llama", shard)]
        assert ranges and max(end for _, end in ranges) <= header_end  # not one tensor byte
        assert hub.stats.bytes_served[("acme/tiny-llama", shard)] == header_end
        assert header_end < len(data)


def test_download_fetches_only_needed_files_then_nothing(hub: HubServer, published: str,
                                                         tiny: dict[str, Path]) -> None:
    model = mhub.resolve("acme/tiny-llama")
    reports: list[tuple[int, int | None]] = []
    folder = mhub.download(model, progress=lambda done, total: reports.append((done, total)))
    assert expected_files(folder) == expected_files(tiny["base"])
    for name in expected_files(folder):
        assert (folder / name).read_bytes() == (tiny["base"] / name).read_bytes()
    for never in ("pytorch_model.bin", "model-Q4_K_M.gguf", "consolidated.safetensors", "README.md"):
        assert hub.stats.bytes_served[("acme/tiny-llama", never)] == 0
    total = sum((tiny["base"] / n).stat().st_size for n in expected_files(tiny["base"]))
    assert reports[-1] == (total, total)

    hub.stats.__init__()
    assert mhub.download(model) == folder
    assert mhub.read_metadata(model).headers == read_local_headers(tiny["base"])
    assert sum(hub.stats.requests.values()) == 0 and hub.stats.total_bytes() == 0


def test_dropped_connection_mid_body_is_resumed(hub: HubServer, published: str,
                                                tiny: dict[str, Path]) -> None:
    hub.inject("resolve_get", "drop", times=1, path=SHARD1)
    folder = mhub.download(mhub.resolve("acme/tiny-llama"))
    assert (folder / SHARD1).read_bytes() == (tiny["base"] / SHARD1).read_bytes()
    assert len(hub.stats.ranges[("acme/tiny-llama", SHARD1)]) == 2  # half, then the rest by Range


def test_transient_failures_are_retried(hub: HubServer, published: str) -> None:
    hub.inject("info", "server_error", times=1)
    hub.inject("info", "rate_limit", times=1, retry_after=0)
    assert mhub.resolve("acme/tiny-llama").sha == published
    assert hub.stats.requests["info"] == 3


def test_bin_only_repo_needs_permission(hub: HubServer, tiny: dict[str, Path]) -> None:
    hub.commit_files("acme/old", {"config.json": (tiny["base"] / "config.json").read_bytes(),
                                  "pytorch_model.bin": b"\0" * 64})
    model = mhub.resolve("acme/old")
    with pytest.raises(ModelError, match="only pickle .bin weights"):
        mhub.read_metadata(model)
    assert mhub.needed_files(model, allow_bin=True) == ["config.json", "pytorch_model.bin"]


# ---------------------------------------------------------------- error messages

def test_typo_suggests_close_names(hub: HubServer, published: str) -> None:
    with pytest.raises(HubError) as e:
        mhub.resolve("acme/tiny-lama")
    assert "acme/tiny-lama was not found on the Hub (did you mean acme/tiny-llama?)" in one_line(e)


def test_gated_repo_says_where_to_accept(hub: HubServer, tiny: dict[str, Path]) -> None:
    hub.upload_folder(tiny["base"], "meta/gated", gated="manual", allowed_users={"bob"})
    with pytest.raises(HubError) as e:  # refused when pinned: access is asked per token (auth_check)
        mhub.resolve("meta/gated", token=WRITE)
    assert f"accept its licence at {hub.url}/meta/gated" in one_line(e)
    assert mhub.resolve("meta/gated", token=BOB).gated
    assert mhub.read_metadata(mhub.resolve("meta/gated", token=BOB), token=BOB).model.access == "gated (granted)"


def test_private_repo_without_access(hub: HubServer, tiny: dict[str, Path]) -> None:
    hub.upload_folder(tiny["base"], "bob/secret", private=True)
    with pytest.raises(HubError) as e:
        mhub.resolve("bob/secret", token=WRITE)
    assert "bob/secret was not found on the Hub; check the spelling, or if it is private, use a token" in one_line(e)
    with pytest.raises(HubError, match="sign in"):
        mhub.resolve("bob/secret")
    assert mhub.resolve("bob/secret", token=BOB).access == "private"


@pytest.mark.parametrize("kind,fault,expected", [
    ("info", "rate_limit", "rate-limiting your requests (HTTP 429); wait 90 seconds"),
    ("info", "server_error", "server error (HTTP 500)"),
    ("info", "unauthorized", "rejected your token"),
    ("info", "drop", "cannot reach the Hub"),
    ("resolve_head", "entry_not_found", "has no file config.json"),
])
def test_hub_failures_become_one_line(hub: HubServer, published: str, kind: str, fault: str,
                                      expected: str) -> None:
    hub.inject(kind, fault, times=None, retry_after=90)
    with pytest.raises(HubError) as e:
        mhub.read_metadata(mhub.resolve("acme/tiny-llama", token=WRITE), token=WRITE)
    assert expected in one_line(e)


def test_revision_not_found(hub: HubServer, published: str) -> None:
    with pytest.raises(HubError) as e:
        mhub.resolve("acme/tiny-llama@v9")
    assert "revision 'v9' of acme/tiny-llama does not exist" in one_line(e)


def test_network_down(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(HubError) as e:
        mhub.resolve("acme/tiny-llama")
    assert f"cannot reach the Hub at http://127.0.0.1:{port}" in one_line(e)


def test_disk_full(hub: HubServer, published: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.file_download as fd

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fd, "_chmod_and_move", full)
    with pytest.raises(HubError) as e:
        mhub.download(mhub.resolve("acme/tiny-llama"))
    assert "the disk is full while downloading acme/tiny-llama" in one_line(e)


@pytest.mark.filterwarnings("ignore:Not enough free disk space")
def test_not_enough_space_is_refused_before_downloading(hub: HubServer, published: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mhub.shutil, "disk_usage", lambda path: type("U", (), {"free": 10})())
    with pytest.raises(HubError, match="needs .* GB but only 0.00 GB are free"):
        mhub.download(mhub.resolve("acme/tiny-llama"))
    assert hub.stats.bytes_served[("acme/tiny-llama", SHARD1)] == 0  # only the small index was read


# ---------------------------------------------------------------- push

@pytest.fixture
def merged(tmp_path: Path, tiny: dict[str, Path]) -> Path:
    """An output folder as the pipeline writes it: weights, config, tokenizer, recipe, card."""
    out = tmp_path / "merged"
    make_tiny_model(out, perturb_from=tiny["base"], seed=9)
    recipe = parse_recipe("models:\n  - model: acme/tiny-llama\n    parameters: {weight: 0.5}\n"
                          "  - model: acme/tiny-chat\n    parameters: {weight: 0.5}\nmerge_method: linear\n",
                          allow_local=False)
    (out / RECIPE_FILE).write_text(recipe.text)
    card = build_card(recipe, parents=[ParentInfo("acme/tiny-llama", "a" * 40, "apache-2.0"),
                                       ParentInfo("acme/tiny-chat", "b" * 40, "mit")], output_name="alice/merged")
    (out / "README.md").write_text(str(card))
    return out


def test_push_uploads_everything_in_one_commit(hub: HubServer, merged: Path) -> None:
    progress: list[tuple[int, int | None]] = []
    result = mhub.push_folder(merged, "alice/merged", token=WRITE, private=True,
                              progress=lambda d, t: progress.append((d, t)))
    history = hub.commit_history("alice/merged")
    assert [c.message for c in history] == ["Upload merged model", "initial commit"]
    assert result.commit_sha == history[0].sha and result.repo_url == f"{hub.url}/alice/merged"
    assert hub.stats.requests["commit"] == 1 and hub.repos["alice/merged"].private
    for name in expected_files(merged):
        assert hub.file_bytes("alice/merged", name) == (merged / name).read_bytes()
    total = sum(p.stat().st_size for p in merged.iterdir())
    assert progress[0] == (0, total) and progress[-1] == (total, total)

    (merged / "model.safetensors").rename(merged / "renamed.safetensors")  # a re-push replaces the old files
    mhub.push_folder(merged, "alice/merged", token=WRITE, private=True)
    files = hub.repo_files("alice/merged")
    assert "renamed.safetensors" in files and "model.safetensors" not in files
    assert len(hub.commit_history("alice/merged")) == 3


def test_failed_commit_deletes_the_new_repo(hub: HubServer, merged: Path) -> None:
    hub.inject("commit", "server_error", times=None)
    with pytest.raises(HubError) as e:
        mhub.push_folder(merged, "alice/merged", token=WRITE, private=False)
    assert "server error (HTTP 500)" in one_line(e) and "deleted again" in str(e.value)
    assert "alice/merged" not in hub.repos


def test_refuses_to_overwrite_a_foreign_repo(hub: HubServer, merged: Path) -> None:
    hub.commit_files("alice/merged", {"README.md": b"# my own model\n"})
    with pytest.raises(HubError) as e:
        mhub.push_folder(merged, "alice/merged", token=WRITE, private=False)
    assert "already exists and was not made by this tool" in one_line(e)
    assert hub.stats.requests["commit"] == 0
    hub.clear_faults()
    hub.inject("commit", "server_error", times=None)
    with pytest.raises(HubError):
        mhub.push_folder(merged, "alice/merged", token=WRITE, private=False, overwrite=True)
    assert "alice/merged" in hub.repos  # not created by this run: never deleted
    hub.clear_faults()
    mhub.push_folder(merged, "alice/merged", token=WRITE, private=False, overwrite=True)
    assert RECIPE_FILE in hub.repo_files("alice/merged")


@pytest.mark.parametrize("token,repo,expected", [
    (READ, "alice/merged", "your token is read-only"),
    (WRITE, "bob/merged", "cannot publish under 'bob'"),
    (WRITE, "readers/merged", "your role in 'readers' is 'read'"),
    (None, "alice/merged", "publishing needs a Hugging Face token"),
    ("hf_revoked", "alice/merged", "rejected your token"),
])
def test_write_access_is_checked_before_uploading(hub: HubServer, merged: Path, token: str | None,
                                                  repo: str, expected: str) -> None:
    with pytest.raises(HubError) as e:
        mhub.push_folder(merged, repo, token=token, private=False)
    assert expected in one_line(e)
    assert not any(hub.stats.requests[k] for k in ("create", "preupload", "lfs_batch", "commit"))


def test_org_namespace_with_write_role(hub: HubServer, merged: Path) -> None:
    mhub.push_folder(merged, "acme/merged", token=WRITE, private=False)
    assert RECIPE_FILE in hub.repo_files("acme/merged")


def test_fine_grained_token_scopes(hub: HubServer, merged: Path) -> None:
    hub.add_token("hf_fine", "alice", "fineGrained", writable=["acme"])
    with pytest.raises(HubError) as e:
        mhub.push_folder(merged, "alice/merged", token="hf_fine", private=False)
    assert "fine-grained token has no 'write' permission on 'alice'" in one_line(e)
    mhub.push_folder(merged, "acme/merged", token="hf_fine", private=False)
    assert RECIPE_FILE in hub.repo_files("acme/merged")


@pytest.mark.parametrize("name", ["merged", "alice/a--b", "alice/..x", "alice/", "alice/x.git", "alice/" + "x" * 97])
def test_invalid_repo_names(hub: HubServer, merged: Path, name: str) -> None:
    with pytest.raises(HubError, match="is not a valid repository name"):
        mhub.push_folder(merged, name, token=WRITE, private=False)
    assert sum(hub.stats.requests.values()) == 0


def test_gguf_files_go_to_their_own_repo(hub: HubServer, merged: Path, tmp_path: Path) -> None:
    gguf = tmp_path / "merged-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + bytes(1000))
    result = mhub.push_folder(merged, "alice/merged", token=WRITE, private=False, gguf_files=[gguf])
    assert result.gguf_repo_url == f"{hub.url}/alice/merged-GGUF"
    assert hub.file_bytes("alice/merged-GGUF", gguf.name) == gguf.read_bytes()
    assert "merged-Q4_K_M.gguf" not in hub.repo_files("alice/merged")
    readme = hub.file_bytes("alice/merged-GGUF", "README.md").decode()
    assert "base_model: alice/merged" in readme and "base_model_relation: quantized" in readme
    assert "| Q4_K_M | 1.00 kB | recommended balance of size and quality |" in readme
    mhub.push_folder(merged, "alice/merged", token=WRITE, private=False, gguf_files=[gguf])  # ours: updatable


def test_token_never_logged_or_shown(hub: HubServer, tiny: dict[str, Path], merged: Path,
                                     caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    secret = "hf_CANARYcanary0123456789abcdef"
    hub.add_token(secret, "alice", "write")
    hub.upload_folder(tiny["base"], "meta/gated", gated="manual")
    messages = []
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    for action in (
        lambda: mhub.read_metadata(mhub.resolve("meta/gated", token=secret), token=secret),
        lambda: mhub.resolve("acme/nothing-here", token=secret),
        lambda: mhub.push_folder(merged, "bob/x", token=secret, private=False),
    ):
        with pytest.raises(HubError) as e:
            action()
        messages.append(str(e.value))
    hub.inject("commit", "server_error", times=None)
    with pytest.raises(HubError) as e:
        mhub.push_folder(merged, "alice/merged", token=secret, private=False)
    messages.append(str(e.value))
    assert len(messages) == 4
    out, err = capsys.readouterr()
    for text in (*messages, caplog.text, out, err):
        assert secret not in text
    assert "(authenticated: True)" in caplog.text  # the client's request log was captured, tokenless
    assert hub.stats.requests["whoami"] >= 1
