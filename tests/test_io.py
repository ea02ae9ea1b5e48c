"""Safetensors headers, exact positional reads and the streaming sharded writer."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merger.errors import ModelError
from merger.sources import TensorReader, read_local_headers, read_safetensors_header, tensor_bytes
from merger.writer import PlannedTensor, ShardedWriter, assign_shards, parse_size


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 4, generator=g).to(torch.float16),
        "b.weight": torch.randn(16, 4, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(3, generator=g),
        "d.ids": torch.arange(5, dtype=torch.int64),
    }


def test_reader_matches_safetensors_library_for_every_dtype(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    with TensorReader(tmp_path) as reader:
        for name, expected in tensors.items():
            got = reader.read(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got, expected)
        # a row range reads exactly those rows (used to split a fused Wqkv)
        assert torch.equal(reader.read("b.weight", rows=(5, 9)), tensors["b.weight"][5:9])


def test_header_offsets_are_absolute_and_sized(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    headers = read_safetensors_header(tmp_path / "model.safetensors")
    raw = (tmp_path / "model.safetensors").read_bytes()
    for name, h in headers.items():
        assert h.nbytes == tensors[name].numel() * tensors[name].element_size()
        assert raw[h.begin:h.end] == bytes(tensor_bytes(tensors[name]))


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-10], "past the end of the file"),
    (lambda raw: raw[:5], "too short"),
    (lambda raw: struct.pack("<Q", 10**12) + raw[8:], "impossible"),
    (lambda raw: raw[:8] + b"x" + raw[9:], "not valid JSON"),
])
def test_corrupt_files_are_reported_in_one_line(tmp_path: Path, damage, message: str) -> None:
    save_file(_tensors(), tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ModelError, match=message) as e:
        read_local_headers(tmp_path)
    assert "\n" not in str(e.value)


def test_header_lying_about_size_is_refused(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(4, 4)}, tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["x"]["shape"] = [4, 8]
    body = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(body) == n
    path.write_bytes(raw[:8] + body + raw[8 + n:])
    with pytest.raises(ModelError, match="claims 64 bytes"):
        read_local_headers(tmp_path)


def test_missing_shard_in_index_is_reported(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors",
                                            "y": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="shard model-00002-of-00002.safetensors .* is missing"):
        read_local_headers(tmp_path)


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 1000**3
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("500MB") == 500 * 1000**2
    assert parse_size("123") == 123
    with pytest.raises(ModelError, match="not a size"):
        parse_size("lots")


def test_assign_shards_respects_size_and_order() -> None:
    plan = [PlannedTensor(f"t{i}", "F32", (10,)) for i in range(5)]  # 40 bytes each
    shards = assign_shards(plan, 100)
    assert [[t.name for t in s] for s in shards] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert len(assign_shards([PlannedTensor("big", "F32", (100,))], 10)) == 1


@pytest.mark.parametrize("shard_size", [10**9, 200])
def test_writer_round_trips_through_safetensors(tmp_path: Path, shard_size: int) -> None:
    tensors = _tensors()
    plan = [PlannedTensor(n, {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
                              torch.int64: "I64"}[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, plan, shard_size=shard_size)
    for name, t in tensors.items():
        writer.write(name, t)
    files = writer.finish()
    loaded = {}
    for f in files:
        if f.endswith(".safetensors"):
            loaded.update(load_file(tmp_path / f))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t)
    if shard_size == 200:
        assert len([f for f in files if f.endswith(".safetensors")]) > 1
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert read_local_headers(tmp_path).keys() == tensors.keys()
    else:
        assert files == ["model.safetensors"]


def test_writer_refuses_out_of_plan_tensors(tmp_path: Path) -> None:
    writer = ShardedWriter(tmp_path, [PlannedTensor("a", "F32", (2,)), PlannedTensor("b", "F32", (2,))])
    with pytest.raises(ValueError, match="expected a next"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(ValueError, match="planned F32"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="only 1 of 2"):
        writer.finish()
