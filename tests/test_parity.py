"""Parity with mergekit 0.1.5 on the shared example recipes, tiny generated models standing in for Hub IDs.

Our contract is mergekit's numerics computed in fp32 and cast at the end; mergekit itself computes in
the recipe's `dtype` (fp16 arithmetic for `dtype: float16`), so it runs here with `dtype: float32` and
`out_dtype` set to the recipe's dtype, on inputs already stored in that dtype. Deterministic methods
must then give the same tensors, at most one rounding step of the output dtype apart; DARE is random in both, so it is compared
statistically: the fraction of entries kept and the size of the rescaled deltas.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merger.pipeline import merge_local, resolve_local
from merger.recipe import parse_recipe
from merger.app.tiny import make_tiny_model
from tests.conftest import EXAMPLE_RECIPES

import mergekit  # noqa: E402,F401  (a test requirement: missing is an error)
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

RECIPES = EXAMPLE_RECIPES


@pytest.fixture(scope="module")
def stand_ins(models_dir: Path):
    """dtype -> {Hub ID -> tiny local model of the same family and role}, stored in that dtype."""
    made: dict[str, dict[str, Path]] = {}

    def get(dtype: str) -> dict[str, Path]:
        if dtype not in made:
            torch_dtype = getattr(torch, dtype)
            root = models_dir / f"parity-{dtype}"

            def family(kind: str, seed: int, names: tuple[str, ...]) -> list[Path]:
                base = make_tiny_model(root / f"{kind}-base", kind, seed=seed, dtype=torch_dtype)
                return [base] + [make_tiny_model(root / f"{kind}-{n}", perturb_from=base, seed=seed * 10 + i,
                                                 perturb_scale=0.05) for i, n in enumerate(names)]

            llama = family("llama", 1, ("chat", "med"))
            phi = family("phi", 5, ("coder", "orange"))
            mistral = [make_tiny_model(root / "mistral-instruct", "mistral", seed=8, num_layers=32, dtype=torch_dtype)]
            mistral.append(make_tiny_model(root / "zephyr", perturb_from=mistral[0], seed=81, perturb_scale=0.05))
            made[dtype] = dict(zip(("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf",
                                    "epfl-llm/meditron-7b", "microsoft/phi-2", "mrm8488/phi-2-coder",
                                    "rhysjones/phi-2-orange", "mistralai/Mistral-7B-Instruct-v0.2",
                                    "HuggingFaceH4/zephyr-7b-beta"), llama + phi + mistral))
        return made[dtype]

    return get


def localize(text: str, stand_ins: dict[str, Path]) -> str:
    for repo, path in stand_ins.items():
        text = re.sub(rf"(?<![\w/.-]){re.escape(repo)}(?![\w/.-])", str(path), text)
    return text


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units of the output dtype's spacing at each value's magnitude, floored at the
    spacing at 1/1000 of the tensor's RMS (results that cancel to ~0 carry the inputs' rounding)."""
    floor = max(b.float().pow(2).mean().sqrt().item() * 1e-3, torch.finfo(a.dtype).tiny)
    spacing = torch.finfo(a.dtype).eps * torch.maximum(a.float().abs(), b.float().abs()).clamp_min(floor)
    return (a.float() - b.float()).abs() / spacing


def run_both(text: str, tmp: Path, seed: int = 0) -> tuple[dict, dict, str]:
    ours_dir, theirs_dir = tmp / "ours", tmp / "theirs"
    recipe = parse_recipe(text)
    merge_local(recipe, resolve_local(recipe), ours_dir, device="cpu", seed=seed)
    config = yaml.safe_load(text)
    config["out_dtype"] = config.get("out_dtype") or config["dtype"]
    config["dtype"] = "float32"
    run_merge(MergeConfiguration.model_validate(config), str(theirs_dir),
              MergeOptions(copy_tokenizer=False, write_model_card=False, random_seed=seed, quiet=True))
    return weights(ours_dir), weights(theirs_dir), recipe.method


def trim_ties(recipe_text: str, name: str) -> torch.Tensor:
    """Entries whose |delta| equals a model's TIES trim threshold: mergekit breaks such ties with an
    unstable sort (an arbitrary choice), so either outcome is the formula."""
    recipe = parse_recipe(recipe_text)
    dtype = getattr(torch, recipe.dtype)
    base = weights(Path(recipe.base_model.repo))[name].to(dtype).float()
    ambiguous = torch.zeros_like(base, dtype=torch.bool)
    for m in recipe.models:
        if m.model == recipe.base_model:
            continue
        delta = (weights(Path(m.model.repo))[name].to(dtype).float() - base).abs().flatten()
        k = max(1, int(float(m.params["density"]) * delta.numel()))
        threshold = delta.sort(descending=True).values[k - 1]
        ambiguous |= (delta == threshold).reshape(base.shape)
    return ambiguous


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shared_recipe_matches_mergekit(path: Path, stand_ins, tmp_path: Path) -> None:
    models = stand_ins(yaml.safe_load(path.read_text())["dtype"])
    text = localize(path.read_text(), models)
    ours, theirs, method = run_both(text, tmp_path)
    assert set(ours) == set(theirs)
    compared = total = 0
    for name in ours:
        a, b = ours[name], theirs[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if method.startswith("dare"):
            continue
        if method == "ties":
            keep = ~trim_ties(text, name)
            a, b = a[keep], b[keep]
        compared, total = compared + a.numel(), total + ours[name].numel()
        distance = ulps(a, b)
        # identical for nearly every entry; where fp32 summation order differs, one rounding step apart
        assert (distance > 1.01).sum() == 0, (name, distance.max().item())
        assert (distance > 0).float().mean() < 0.02, (name, (distance > 0).float().mean().item())
    assert compared > 0.95 * total or method.startswith("dare")
    if method.startswith("dare"):
        base = weights(models["meta-llama/Llama-2-7b-hf"])
        for name in [n for n in ours if n.endswith("proj.weight")]:
            d_ours = ours[name].float() - base[name].float()
            d_theirs = theirs[name].float() - base[name].float()
            kept_ours = (d_ours != 0).float().mean().item()
            kept_theirs = (d_theirs != 0).float().mean().item()
            assert abs(kept_ours - kept_theirs) < 0.05, (name, kept_ours, kept_theirs)
            ratio = d_ours.abs().mean().item() / d_theirs.abs().mean().item()
            assert 0.9 < ratio < 1.1, (name, ratio)
