"""The whole job against the local Hub-protocol server: check without weights, run, GGUF, push, reproduce."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, snapshot_download
from safetensors.torch import load_file

from merger.app import tiny
from merger.pipeline import merge_local, resolve_local
from merger.recipe import parse_recipe
from merger.sources import read_local_headers

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_alice_write"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "merger", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)


def header_end(folder: Path, file: str) -> int:
    raw = (folder / file).read_bytes()
    return 8 + int.from_bytes(raw[:8], "little")


def tensor_bytes_served(server, repos: dict[str, Path]) -> int:
    """Bytes served from safetensors files beyond their headers (tensor data)."""
    total = 0
    for repo, folder in repos.items():
        for file in {h.file for h in read_local_headers(folder).values()}:
            end = header_end(folder, file)
            for start, stop in server.stats.ranges.get((repo, file), []):
                total += max(0, stop - max(start, end))
    return total


@pytest.fixture
def hub_models(hub, llama_family):
    repos = {"acme/base": llama_family["base"], "acme/chat": llama_family["chat"], "acme/med": llama_family["med"]}
    for repo, folder in repos.items():
        hub.upload_folder(folder, repo)
    return repos


TIES = """models:
  - model: acme/base
  - model: acme/chat
    parameters: {density: 0.5, weight: 0.5}
  - model: acme/med
    parameters: {density: 0.5, weight: 0.5}
merge_method: ties
base_model: acme/base
parameters: {normalize: true}
dtype: float16
"""


def test_check_of_hub_models_reads_no_tensor_bytes(hub, hub_models, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yml"
    recipe.write_text(TIES)
    before = hub.stats.total_bytes()
    result = cli("check", str(recipe), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and [m["ref"] for m in report["models"]] == list(hub_models)
    assert all(m["access"] == "public" for m in report["models"])
    assert tensor_bytes_served(hub, hub_models) == 0
    assert hub.stats.total_bytes() - before < 100_000  # configs, tokenizer configs and headers only


def test_run_stops_before_any_download_when_the_check_fails(hub, hub_models, qwen_family, tmp_path) -> None:
    hub.upload_folder(qwen_family["a"], "acme/qwen")
    recipe = tmp_path / "r.yml"
    recipe.write_text(TIES.replace("acme/med", "acme/qwen"))
    result = cli("run", str(recipe), str(tmp_path / "out"))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: pre-flight check failed") and "cannot be merged with" in last
    assert tensor_bytes_served(hub, {**hub_models, "acme/qwen": qwen_family["a"]}) == 0
    assert not (tmp_path / "out").exists()


def test_run_push_gguf_then_reproduce_from_the_pushed_recipe(hub, hub_models, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yml"
    recipe.write_text(TIES)
    out = tmp_path / "out"
    result = cli("run", str(recipe), str(out), "--push", "alice/tiny-ties", "--gguf", "Q8_0", "--token", TOKEN)
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert "alice/tiny-ties" in result.stdout
    pulled = Path(snapshot_download("alice/tiny-ties", cache_dir=tmp_path / "pull", token=TOKEN, endpoint=hub.url))
    served_after_first = hub.stats.total_bytes()
    files = sorted(p.name for p in pulled.iterdir())
    for name in ("config.json", "model.safetensors", "README.md", "mergekit_config.yml", "tokenizer.json",
                 "tiny-ties-Q8_0.gguf"):
        assert name in files, files
    assert not any(name.endswith("-F16.gguf") for name in files)  # intermediate not asked for: deleted
    assert (pulled / "mergekit_config.yml").read_text() == TIES
    merged = weights(pulled)
    assert all(torch.isfinite(t.float()).all() for t in merged.values())

    card = ModelCard((pulled / "README.md").read_text())
    assert card.data.base_model == list(hub_models)
    assert card.data.base_model_relation == "merge"
    assert {"merge", "mergekit", "ties", "gguf"} <= set(card.data.tags)
    assert "Q8_0" in card.text and "lm_eval" in card.text and "python -m merger run" in card.text
    assert "max rel. error" in card.text  # the GGUF was loaded in llama.cpp and compared with the merge

    for path in list(out.rglob("*")) + list(pulled.rglob("*")):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path

    again = cli("run", str(pulled / "mergekit_config.yml"), str(tmp_path / "again"), "--token", TOKEN)
    assert again.returncode == 0, again.stderr
    reproduced = weights(tmp_path / "again")
    assert reproduced.keys() == merged.keys() and all(torch.equal(reproduced[n], merged[n]) for n in merged)
    model_bytes = sum(hub.stats.bytes_served.get((repo, f), 0) for repo in hub_models
                      for f in ("model.safetensors",))
    assert hub.stats.total_bytes() - served_after_first < 200_000  # headers again, no weights: cache reused
    sizes = sum((folder / "model.safetensors").stat().st_size for folder in hub_models.values())
    assert sizes <= model_bytes < sizes + 100_000  # each model's weights downloaded once (plus header reads)


def test_push_refuses_a_token_without_write_access_before_merging(hub, hub_models, tmp_path) -> None:
    recipe = tmp_path / "r.yml"
    recipe.write_text(TIES)
    result = cli("run", str(recipe), str(tmp_path / "out"), "--push", "acme-other/x", "--token", "hf_alice_read")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error:")
    assert "hf_alice_read" not in result.stderr
    assert not (tmp_path / "out").exists() and tensor_bytes_served(hub, hub_models) == 0


def test_gated_and_missing_models_give_actionable_messages(hub, hub_models, tmp_path) -> None:
    hub.upload_folder(hub_models["acme/med"], "meta/gated", gated=True)
    recipe = tmp_path / "r.yml"
    recipe.write_text(TIES.replace("acme/med", "meta/gated"))
    result = cli("check", str(recipe))
    assert result.returncode == 1 and f"accept its licence at {hub.url}/meta/gated" in result.stdout, result.stdout
    recipe.write_text(TIES.replace("acme/med", "acme/chta"))
    result = cli("check", str(recipe))
    assert result.returncode == 1 and "acme/chat" in result.stdout  # did you mean


def _legacy_copy(src: Path, dst: Path) -> Path:
    """The same Phi-2 weights saved in the old phi-msft layout (fused Wqkv, transformer.* names)."""
    config = json.loads((src / "config.json").read_text())
    legacy_config, tensors = tiny._legacy_phi(config, load_file(src / "model.safetensors"))
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    tiny.write_safetensors(dst / "model.safetensors", tensors)
    (dst / "config.json").write_text(json.dumps(legacy_config))
    return dst


def test_legacy_phi_finetunes_merge_like_new_layout_ones(models_dir: Path, tmp_path: Path) -> None:
    base = tiny.make_tiny_model(models_dir / "phi2-base", "phi", seed=7, dtype=torch.float32)
    new = [tiny.make_tiny_model(models_dir / f"phi2-ft{i}", perturb_from=base, seed=70 + i, perturb_scale=0.05)
           for i in (1, 2)]
    old = [_legacy_copy(p, tmp_path / f"legacy{i}") for i, p in enumerate(new)]
    assert "transformer.h.0.mixer.Wqkv.weight" in read_local_headers(old[0])

    def ties(models: list[Path], out: Path) -> dict[str, torch.Tensor]:
        recipe = parse_recipe(f"""models:
  - model: {base}
  - model: {models[0]}
    parameters: {{density: 0.5, weight: 0.6}}
  - model: {models[1]}
    parameters: {{density: 0.5, weight: 0.4}}
merge_method: ties
base_model: {base}
dtype: float32
""")
        merge_local(recipe, resolve_local(recipe), out)
        return weights(out)

    from_new, from_old = ties(new, tmp_path / "a"), ties(old, tmp_path / "b")
    assert from_new.keys() == from_old.keys()
    assert all(torch.equal(from_new[n], from_old[n]) for n in from_new)
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["model_type"] == "phi" and "auto_map" not in config
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert type(model).__name__ == "PhiForCausalLM"
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_gguf_is_streamed_during_the_merge_and_equals_a_separate_conversion(
        llama_family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """merge + GGUF is one pass: the F16 file is written from the merged tensors as they are produced,
    and it holds what converting the finished folder gives (same tensors and values, same metadata)."""
    import gguf
    import numpy as np

    import quantize.convert as qc
    from merger.pipeline import RunOptions, run

    recipe = parse_recipe(f"""models:
  - model: {llama_family['base']}
  - model: {llama_family['chat']}
merge_method: slerp
base_model: {llama_family['base']}
parameters: {{t: 0.4}}
""")
    written: list[str] = []
    original_write = qc.GGUFStream.write

    def spy(self, name, tensor):  # noqa: ANN001, ANN202
        written.append(name)
        return original_write(self, name, tensor)

    monkeypatch.setattr(qc.GGUFStream, "write", spy)
    result = run(recipe, RunOptions(out_dir=tmp_path / "out", device="cpu", gguf=("F16", "Q8_0")))
    assert {p.name for p in result.gguf_files} == {"out-F16.gguf", "out-Q8_0.gguf"}
    assert written == [o.name for o in result.plan.outputs]  # fed by the merge, tensor by tensor
    monkeypatch.undo()
    separate = qc.convert_folder(result.out_dir, tmp_path / "separate-F16.gguf", "f16", name="out")[0]
    ours, theirs = gguf.GGUFReader(result.out_dir / "out-F16.gguf"), gguf.GGUFReader(separate)
    by_name = {t.name: t for t in theirs.tensors}
    assert {t.name for t in ours.tensors} == set(by_name)
    for t in ours.tensors:
        assert np.array_equal(np.asarray(t.data), np.asarray(by_name[t.name].data)), t.name
    assert set(ours.fields) == set(theirs.fields)


def test_cli_takes_the_token_from_hf_token(hub, hub_models, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yml"
    recipe.write_text(TIES)
    result = cli("run", str(recipe), str(tmp_path / "out"), "--push", "alice/from-env",
                 env_extra={"HF_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert "mergekit_config.yml" in hub.repo_files("alice/from-env")
    assert TOKEN not in result.stdout + result.stderr
