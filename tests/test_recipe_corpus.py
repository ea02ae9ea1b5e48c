"""Published recipes (tests/recipes/, each with its source in its first line) judged by mergekit 0.1.5
and by us, side by side: what mergekit accepts we accept, what it rejects we refuse.

mergekit's verdict is its own code: yaml.safe_load (as mergekit-yaml reads files), its pydantic
MergeConfiguration (MoEMergeConfig and is_bad_config for mergekit-moe files), then its MergePlanner on
tiny stand-in models, which binds every parameter of every tensor and checks every input contract
(the step where a typo'd method, a missing `t` or a base outside the slice fails) without merging.
Ours is `parse_recipe` on the text as published, then the pre-flight check on the same stand-ins.
Every model a recipe names becomes its own tiny Llama folder with as many layers as the recipe's
largest layer_range end (4 when it has none).

A few things mergekit accepts are not supported here yet; those recipes must be refused with one line
that says so (NOT_YET), never with a misleading error.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from merger.app.tiny import make_tiny_model
from merger.check import check_recipe
from merger.errors import MergerError
from merger.moe import is_moe
from merger.moe.check import check_moe
from merger.recipe import ModelRef, parse_recipe

from mergekit import merge_methods  # noqa: E402  (mergekit is a test requirement: a missing one is an error)
from mergekit.architecture import get_architecture_info  # noqa: E402
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import _model_out_config  # noqa: E402
from mergekit.moe.config import MoEMergeConfig, is_bad_config  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402
from mergekit.plan import MergePlanner  # noqa: E402

CORPUS = sorted((Path(__file__).parent / "recipes").glob("*.yml"))
NOT_YET: dict[str, str] = {}  # what mergekit accepts and we refuse for now, and the refusal's words
KNOWN_DIFFERENCES = {  # where we knowingly differ from mergekit 0.1.5, and why
    "capybara-tess-yi-34b-200k": "mergekit compares local paths as strings, so its base '//home/alpha/x' is a "
                                 "fourth model beside '/home/alpha/x' (without a weight: rejected); here both "
                                 "name one folder, the base",
}
_MODEL_KEYS = ("model", "base_model", "source_model", "tokenizer_source")


def test_the_corpus_is_large_and_sourced() -> None:
    assert len(CORPUS) >= 60
    for path in CORPUS:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert re.match(r"# source: https://\S+", first), path.name


def _layers(data: Any) -> int:
    """The largest layer_range end anywhere in the recipe (4 when there is none)."""
    ends = [4]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            rng = node.get("layer_range")
            if isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, int) for v in rng):
                ends.append(rng[1])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(data)
    return max(ends)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """name -> a tiny Llama folder of its own (hard links of one template per layer count)."""
    root = tmp_path_factory.mktemp("corpus-models")
    templates: dict[int, Path] = {}
    made: dict[tuple[str, int], Path] = {}

    def get(name: str, layers: int) -> Path:
        if layers not in templates:
            templates[layers] = make_tiny_model(root / f"template-{layers}", "llama", num_layers=layers,
                                                hidden=16, seed=layers)
        key = (name, layers)
        if key not in made:
            folder = root / f"m{len(made)}"
            shutil.copytree(templates[layers], folder, copy_function=os.link)
            made[key] = folder
        return made[key]

    return get


def _localized(data: Any, folder_of) -> Any:
    """The parsed YAML with every model reference replaced by its stand-in folder."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            if key in _MODEL_KEYS and isinstance(value, str) and value not in ("base", "union"):
                out[key] = str(folder_of(value))
            else:
                out[key] = _localized(value, folder_of)
        return out
    if isinstance(data, list):
        return [_localized(v, folder_of) for v in data]
    return data


def mergekit_verdict(text: str, folder_of, tmp: Path) -> tuple[bool, str]:
    """(accepted, why) by mergekit 0.1.5's own code, planning on the stand-ins."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return False, f"yaml: {' '.join(str(e).split())[:80]}"
    if not isinstance(data, dict):
        return False, "not a mapping"
    if "experts" in data:
        try:
            moe = MoEMergeConfig.model_validate(data)
        except Exception as e:  # pydantic's ValidationError or mergekit's RuntimeError
            return False, f"moe schema: {type(e).__name__}"
        return (not is_bad_config(moe, allow_all_same=True)), "moe"
    try:
        MergeConfiguration.model_validate(data)
        config = MergeConfiguration.model_validate(_localized(data, folder_of))
        merge_methods.get(config.merge_method)
        options = MergeOptions(quiet=True)
        arch_info = get_architecture_info(config, options)
        out_config = _model_out_config(config, arch_info)
        MergePlanner(config, arch_info, options=options, out_model_config=out_config).plan_to_disk(str(tmp))
    except Exception as e:  # whatever mergekit raises is a rejection; the reason is kept for the report
        return False, f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
    return True, "planned"


def our_verdict(text: str, folder_of, tmp: Path) -> tuple[bool, str]:
    try:
        recipe = parse_recipe(text, allow_local=True, base_dir=tmp)
    except MergerError as e:
        return False, str(e)
    mapping = {ref: ModelRef(str(folder_of(str(ref))), None, True) for ref in recipe.referenced_models()}
    report = (check_moe if is_moe(recipe) else check_recipe)(recipe.with_models(mapping))
    errors = [p.message for p in report.problems if p.severity == "error"]
    return (not errors), "; ".join(errors) or "ok"


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_published_recipe_is_judged_like_mergekit(path: Path, stand_ins, tmp_path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    try:
        layers = _layers(yaml.safe_load(text))
    except yaml.YAMLError:
        layers = 4

    def folder_of(name: str) -> Path:
        return stand_ins(name.split("@")[0], layers)

    theirs, their_reason = mergekit_verdict(text, folder_of, tmp_path / "mergekit")
    ours, our_reason = our_verdict(text, folder_of, tmp_path / "ours")
    not_yet = [words for words in NOT_YET.values() if words in our_reason]
    if path.stem in KNOWN_DIFFERENCES:
        assert ours != theirs, f"{path.stem} is listed as a difference but both say {ours}"
    elif theirs and not ours:
        assert not_yet, f"mergekit accepts ({their_reason}) but we refuse: {our_reason}"
    else:
        assert ours == theirs, f"mergekit: {their_reason}; ours: {our_reason}"
    assert "\n" not in our_reason


def test_the_corpus_covers_acceptance_and_refusal(stand_ins, tmp_path: Path) -> None:
    """The corpus is not one-sided: it holds recipes mergekit accepts and recipes it rejects."""
    verdicts = []
    for i, path in enumerate(CORPUS):
        text = path.read_text(encoding="utf-8")
        try:
            layers = _layers(yaml.safe_load(text))
        except yaml.YAMLError:
            layers = 4
        verdicts.append(mergekit_verdict(text, lambda n: stand_ins(n.split("@")[0], layers), tmp_path / str(i))[0])
    assert sum(verdicts) >= 40 and verdicts.count(False) >= 8, (sum(verdicts), verdicts.count(False))
