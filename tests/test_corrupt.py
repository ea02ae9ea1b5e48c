"""Corrupt model files: each corruption is reported in one line by `check` or by `run` (the test says which),
and a run never leaves an output folder, a partial folder, or a model holding NaN/Inf.

Everything goes through the CLI entry point (`merger.__main__.main`) in-process, so the exit codes and the
one-line messages are the ones a user sees; the models are 2-layer tiny Llamas, the fine-tune sharded.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from merger.__main__ import main
from merger.app.tiny import make_tiny_model

S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
UP = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("corrupt")
    base = make_tiny_model(root / "base", "llama", seed=1, num_layers=2)
    return base, make_tiny_model(root / "ft", perturb_from=base, seed=2, perturb_scale=0.05, shards=2)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def last_line(err: str) -> str:
    lines = err.strip().splitlines()
    return lines[-1] if lines else ""


def scan_outputs(root: Path) -> list[str]:
    """NaN/Inf tensors in any output or partial output folder under root (the 'never write NaN' claim)."""
    bad = []
    for f in [f for d in root.glob("*out*") for f in d.rglob("*.safetensors")]:
        bad += [f"{f.name}:{n}" for n, t in load_file(f).items() if t.is_floating_point() and not torch.isfinite(t).all()]
    return bad


def rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def set_value(folder: Path, name: str, value: float) -> None:
    for file in (S1, S2):
        tensors = load_file(folder / file)
        if name in tensors:
            tensors[name][0, 0] = value
            save_file(tensors, folder / file, metadata={"format": "pt"})
            return
    raise AssertionError(name)


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _tensors(h: dict) -> list[str]:
    return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


def _overlap(h: dict) -> None:
    a, b = _tensors(h)[:2]
    size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
    h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + size]


def _double_shape(h: dict) -> None:
    k = _tensors(h)[0]
    h[k]["shape"] = [h[k]["shape"][0] * 2, *h[k]["shape"][1:]]


def _past_end(h: dict) -> None:
    k = _tensors(h)[-1]
    h[k]["data_offsets"] = [o + 4096 for o in h[k]["data_offsets"]]


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # name: (corrupt the fine-tune folder, which command reports it, words in its one line)
    "truncated tensor data": (lambda d: (d / S2).write_bytes((d / S2).read_bytes()[:-100]),
                              "run", "ends past the end of the file (truncated download?)"),
    "truncated inside the header": (lambda d: (d / S2).write_bytes((d / S2).read_bytes()[:50]),
                                    "check", "header length (1120) is impossible"),
    "3-byte file": (lambda d: (d / S2).write_bytes(b"abc"), "check", "is too short to be a safetensors file"),
    "header length 2**63": (lambda d: (d / S2).write_bytes(struct.pack("<Q", 2**63) + (d / S2).read_bytes()[8:]),
                            "check", "header length (9223372036854775808) is impossible"),
    "header not JSON": (lambda d: (d / S2).write_bytes((d / S2).read_bytes()[:8] + b"\xff" * 2000),
                        "check", "the safetensors header is not valid JSON"),
    "offsets overlap": (lambda d: rewrite_header(d / S2, _overlap), "check", "overlap in the file"),
    "size disagrees with shape": (lambda d: rewrite_header(d / S2, _double_shape), "check", "bytes but shape"),
    "offsets past the end": (lambda d: rewrite_header(d / S2, _past_end), "run", "ends past the end of the file"),
    "shard missing from the index": (lambda d: (d / S2).unlink(), "check",
                                     f"shard {S2} listed in model.safetensors.index.json is missing"),
    "index names a tensor in no shard": (
        lambda d: (d / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {**json.loads((d / "model.safetensors.index.json").read_text())["weight_map"],
                            "model.layers.9.x.weight": S1}})),
        "check", "are in no shard (first: model.layers.9.x.weight)"),
    "shard outside the folder": (
        lambda d: (d / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"model.embed_tokens.weight": "../../etc/passwd"}})),
        "check", "names a shard outside the folder"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{"), "check", "config.json is not valid JSON"),
    "num_hidden_layers 6, 2 layers of tensors": (lambda d: edit_config(d, num_hidden_layers=6), "check",
                                                 "missing in"),
    "NaN weight": (lambda d: set_value(d, UP, float("nan")), "run", f"NaN or Inf values in {UP}"),
    "Inf weight": (lambda d: set_value(d, UP, float("inf")), "run", f"NaN or Inf values in {UP}"),
    "NaN in the embedding": (lambda d: set_value(d, "model.embed_tokens.weight", float("nan")), "run",
                             "NaN or Inf values in model.embed_tokens.weight"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_is_reported_in_one_line(name: str, pair, tmp_path: Path, capsys) -> None:
    base, ft = pair
    corrupt, reporter, words = CORRUPTIONS[name]
    bad = tmp_path / "bad"
    shutil.copytree(ft, bad)
    corrupt(bad)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {bad}\n"
                      "    parameters: {weight: 1.0, density: 0.7}\n")
    code, out, err = cli(capsys, "check", str(recipe))
    errors = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("[error]")]
    if reporter == "check":
        assert code == 1 and len(errors) >= 1 and any(words in e for e in errors), out
    else:
        assert code == 0 and not errors, out  # headers alone look fine: the check reads no tensor bytes
    target = tmp_path / "out"
    code, out, err = cli(capsys, "run", str(recipe), str(target), "--device", "cpu")
    line = last_line(err)
    assert code == 2 and line.startswith("error: ") and words in line, err
    assert "Traceback" not in err and out == ""
    assert not target.exists() and not list(tmp_path.glob(".out.partial-*"))
    assert scan_outputs(tmp_path) == []


def test_passthrough_copy_of_a_nan_tensor_is_refused(pair, tmp_path: Path, capsys) -> None:
    """A copied tensor is not merged arithmetic, but it is written all the same: it is scanned too."""
    _, ft = pair
    bad = tmp_path / "bad"
    shutil.copytree(ft, bad)
    set_value(bad, UP, float("nan"))
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {bad}\n"
                      "        layer_range: [0, 2]\n")
    code, _, err = cli(capsys, "run", str(recipe), str(tmp_path / "out"), "--device", "cpu")
    assert code == 2 and f"NaN or Inf values in {UP}" in last_line(err)
    assert not (tmp_path / "out").exists() and scan_outputs(tmp_path) == []


def test_float16_overflow_of_a_finite_merge_is_refused(pair, tmp_path: Path, capsys) -> None:
    """weight 1e5 without normalisation: finite in fp32, Inf once cast to float16 (max 65504)."""
    base, ft = pair
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 100000}}\n"
                      f"  - model: {ft}\n    parameters: {{weight: 1}}\nparameters: {{normalize: false}}\n"
                      "dtype: float16\n")
    code, _, err = cli(capsys, "run", str(recipe), str(tmp_path / "out"), "--device", "cpu")
    assert code == 2 and "NaN or Inf values in" in last_line(err) and "range" in last_line(err)
    assert not (tmp_path / "out").exists() and scan_outputs(tmp_path) == []


def test_vocab_size_vs_embedding_rows_is_noted_and_the_output_is_consistent(pair, tmp_path, capsys) -> None:
    base, ft = pair
    odd = tmp_path / "odd"
    shutil.copytree(ft, odd)
    edit_config(odd, vocab_size=1000)
    rows = load_file(ft / S1)["model.embed_tokens.weight"].shape[0]
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {odd}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {base}\n    parameters: {{weight: 0.5}}\n")
    code, out, _ = cli(capsys, "check", str(recipe))
    assert code == 0 and f"config vocab_size is 1000 but the embedding has {rows} rows" in out
    code, _, err = cli(capsys, "run", str(recipe), str(tmp_path / "out"), "--device", "cpu")
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == rows == load_file(tmp_path / "out" / "model.safetensors")[
        "model.embed_tokens.weight"].shape[0]
    assert scan_outputs(tmp_path / "out") == []


def test_hidden_size_contradicting_the_headers_is_reported(pair, tmp_path: Path, capsys) -> None:
    base, ft = pair
    odd = tmp_path / "odd"
    shutil.copytree(base, odd)
    edit_config(odd, hidden_size=128)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {odd}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {ft}\n    parameters: {{weight: 0.5}}\n")
    code, out, _ = cli(capsys, "check", str(recipe))
    assert code == 1 and "hidden_size" in out
