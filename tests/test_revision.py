"""A recipe that names a revision (`org/name@rev`, or mergekit's `{path: ..., revision: ...}`) is checked
and merged at that revision, not at the head of the repo; the model and its LoRA adapter each at their own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merger.app.tiny import make_tiny_model
from merger.check import check_recipe
from merger.pipeline import RunOptions, run
from merger.recipe import parse_recipe
from tests.hubserver import hub  # noqa: F401  (fixture)
from tests.test_parity import weights


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("revisions")
    v1 = make_tiny_model(root / "v1", "llama", seed=41)
    v2 = make_tiny_model(root / "v2", "llama", perturb_from=v1, seed=42, perturb_scale=0.1)
    return {"v1": v1, "v2": v2}


@pytest.mark.parametrize("form", ["{repo}@{sha}", "{{path: {repo}, revision: {sha}}}"])
def test_a_named_revision_is_merged_at_that_revision(form: str, hub, versions, tmp_path: Path) -> None:
    first = hub.upload_folder(versions["v1"], "acme/evolving")
    head = hub.commit_files("acme/evolving", {"model.safetensors": (versions["v2"] / "model.safetensors").read_bytes()})
    assert head != first
    model = form.format(repo="acme/evolving", sha=first)
    text = f"models:\n  - model: {{model: {model}}}\nmerge_method: passthrough\n"
    recipe = parse_recipe(text)
    assert recipe.models[0].model.revision == first
    assert check_recipe(recipe).ok
    run(recipe, RunOptions(tmp_path / "pinned", device="cpu", evaluate=False, lineage=False))
    run(parse_recipe("models:\n  - model: acme/evolving\nmerge_method: passthrough\n"),
        RunOptions(tmp_path / "head", device="cpu", evaluate=False, lineage=False))
    pinned, latest = weights(tmp_path / "pinned"), weights(tmp_path / "head")
    v1, v2 = weights(versions["v1"]), weights(versions["v2"])
    assert all(torch.equal(pinned[n], v1[n]) for n in v1)
    assert all(torch.equal(latest[n], v2[n]) for n in v2) and any(not torch.equal(v1[n], v2[n]) for n in v1)
