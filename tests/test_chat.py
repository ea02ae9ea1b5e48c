"""Chat with a merge (merger.app.chat): llama.cpp replies with the model's chat template, streamed; bounds
on context and time; one reply at a time per user; a published merge's GGUF found on the Hub."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from merger.app.chat import ChatLimits, ChatSessions, pick_gguf, resolve_gguf
from merger.app.tiny import make_tiny_model
from merger.errors import MergerError
from quantize.llama import export_gguf
from tests.hubserver import HubServer


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    model = make_tiny_model(root / "m", "llama", seed=41, num_layers=2)
    return export_gguf(model, root / "out", "m", None, ["Q8_0"])[0]


def test_reply_streams_what_llama_cpp_writes_with_the_template(gguf_file: Path) -> None:
    import llama_cpp

    chats = ChatSessions(ChatLimits(max_tokens=12, temperature=0.0))
    try:
        steps = list(chats.reply("alice", gguf_file, [], "Hello there"))
    finally:
        chats.close()
    assert len(steps) >= 2 and all(b.startswith(a) for a, b in zip(steps, steps[1:]))  # grows token by token
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=2048, verbose=False)
    try:
        direct = llm.create_chat_completion(messages=[{"role": "user", "content": "Hello there"}], max_tokens=12,
                                            temperature=0.0)
        assert "[INST]" in llm.metadata["tokenizer.chat_template"]  # the model's own template is applied
    finally:
        llm.close()
    assert steps[-1] == direct["choices"][0]["message"]["content"]


def test_one_reply_at_a_time_per_user(gguf_file: Path) -> None:
    chats = ChatSessions(ChatLimits(max_tokens=8))
    try:
        first = chats.reply("alice", gguf_file, [], "one")
        next(first)  # alice's reply is being written
        with pytest.raises(MergerError, match="a reply is still being written"):
            next(chats.reply("alice", gguf_file, [], "two"))
        assert next(chats.reply("bob", gguf_file, [], "hi")) is not None  # another user is not blocked
        list(first)
        assert list(chats.reply("alice", gguf_file, [], "three"))  # free again once done
    finally:
        chats.close()


def test_time_and_context_are_bounded(gguf_file: Path) -> None:
    chats = ChatSessions(ChatLimits(max_tokens=64, seconds=0.0, temperature=0.0))
    try:
        assert list(chats.reply("a", gguf_file, [], "go"))[-1].endswith("[stopped: 0 s limit]")
    finally:
        chats.close()
    small = ChatSessions(ChatLimits(n_ctx=128, max_tokens=16))
    try:
        long_history = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 30} for i in range(8)]
        assert list(small.reply("a", gguf_file, long_history, "and now?"))  # oldest turns dropped to fit
        with pytest.raises(MergerError, match="too long for a 128-token context"):
            list(small.reply("a", gguf_file, [], "word " * 400))
        with pytest.raises(MergerError, match="type a message first"):
            list(small.reply("a", gguf_file, [], "  "))
    finally:
        small.close()


def test_sessions_beyond_the_limit_release_their_model(gguf_file: Path) -> None:
    chats = ChatSessions(ChatLimits(max_tokens=2, sessions=2))
    try:
        for user in ("a", "b", "c"):
            list(chats.reply(user, gguf_file, [], "hi"))
        assert list(chats._models) == ["b", "c"]
    finally:
        chats.close()


def test_pick_gguf_prefers_q4_k_m_and_first_split_part() -> None:
    assert pick_gguf(["m-F16.gguf", "m-Q8_0.gguf", "m-Q4_K_M.gguf", "README.md"]) == "m-Q4_K_M.gguf"
    assert pick_gguf(["m-Q8_0-00002-of-00002.gguf", "m-Q8_0-00001-of-00002.gguf"]) == "m-Q8_0-00001-of-00002.gguf"
    assert pick_gguf(["m-F16.gguf"]) == "m-F16.gguf" and pick_gguf(["config.json"]) is None


def test_a_published_merge_is_found_on_the_hub(gguf_file: Path, hub: HubServer, tmp_path: Path) -> None:
    folder = tmp_path / "repo"
    folder.mkdir()
    shutil.copy(gguf_file, folder / gguf_file.name)
    (folder / "README.md").write_text("# m\n")
    hub.upload_folder(folder, "alice/m-GGUF")
    got = resolve_gguf("alice/m-GGUF", token="hf_alice_write")
    assert got.name == gguf_file.name and got.read_bytes() == gguf_file.read_bytes()
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "README.md").write_text("x")
    hub.upload_folder(tmp_path / "e", "alice/empty")
    with pytest.raises(MergerError, match="alice/empty has no GGUF file to chat with"):
        resolve_gguf("alice/empty", token="hf_alice_write")
    assert resolve_gguf(str(gguf_file)) == gguf_file
    with pytest.raises(MergerError, match="missing.gguf: no such GGUF file"):
        resolve_gguf(str(tmp_path / "missing.gguf"))


def test_after_a_run_the_chat_points_at_its_gguf(tmp_path: Path) -> None:
    from merger.app import demo
    from merger.app.runs import DONE, Outcome, Snapshot

    files = (("model.safetensors", 1), ("m-Q8_0.gguf", 2), ("m-Q4_K_M.gguf", 3))
    local = Outcome(files, "", (), {}, (), tmp_path, 1.0)
    snap = Snapshot("j", DONE, "done", 1.0, "", 0, 0, None, (), local)
    assert demo.chat_source(snap, allow_local=True) == str(tmp_path / "m-Q4_K_M.gguf")
    pushed = Outcome(files, "", ("http://hub/alice/m", "http://hub/alice/m-GGUF"), {}, (), None, 1.0)
    snap = Snapshot("j", DONE, "done", 1.0, "", 0, 0, None, (), pushed)
    assert demo.chat_source(snap, allow_local=False) == "alice/m-GGUF"
    no_gguf = Outcome(files[:1], "", (), {}, (), tmp_path, 1.0)
    assert demo.chat_source(Snapshot("j", DONE, "done", 1.0, "", 0, 0, None, (), no_gguf), allow_local=True) == ""
    assert demo.chat_source(None, allow_local=True) == ""
