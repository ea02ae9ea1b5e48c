"""Security review, as tests: the token stays secret, Space mode names Hub repos only, remote code never
runs, pushes go only where the token may write, and output repo names are validated before anything happens.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest

from merger import hub as mhub
from merger import hub_errors
from merger.__main__ import main
from merger.errors import HubError, MergerError, ModelError, RecipeError
from merger.pipeline import RunOptions, run
from merger.recipe import parse_recipe
from merger.app.tiny import make_tiny_model
from tests.conftest import ACME_TIES_RECIPE as RECIPE
from tests.hubserver import HubServer

REPO = Path(__file__).resolve().parents[1]
SECRET = "hf_SeCrEt_reliability_0123456789abcdef"  # recognisable anywhere it might leak


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_errors, "RETRY_DELAYS", (0.0,))


@pytest.fixture
def published(hub: HubServer, tiny: dict[str, Path]) -> HubServer:
    hub.add_token(SECRET, "alice", "write")
    hub.upload_folder(tiny["base"], "acme/base")
    hub.upload_folder(tiny["chat"], "acme/chat")
    return hub


def files_containing(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


# ---------------------------------------------------------------- the token

def test_token_never_appears_in_logs_output_files_cards_or_pushed_repos(published: HubServer, tmp_path: Path,
                                                                       caplog, capfd) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, huggingface_hub and httpx included
    out = tmp_path / "out"
    result = run(parse_recipe(RECIPE), RunOptions(out, device="cpu", token=SECRET, push="alice/secret-test",
                                                  gguf=("F16",)))
    assert result.pushed and result.gguf_files
    pushed = {path: published.file_bytes("alice/secret-test", path)
              for path in published.repo_files("alice/secret-test")}
    assert {"README.md", "mergekit_config.yml", "config.json", "model.safetensors"} <= set(pushed)
    assert [p for p, data in pushed.items() if SECRET.encode() in data] == []
    # failures print errors: a rejected token, a namespace it cannot write, a server error
    errors = []
    for setup, push in ((lambda: published.inject("*", "unauthorized", times=None), "alice/x"),
                        (lambda: None, "bob/x"),
                        (lambda: published.inject("commit", "server_error", times=None), "alice/y")):
        published.clear_faults()
        setup()
        with pytest.raises(MergerError) as e:
            run(parse_recipe(RECIPE), RunOptions(tmp_path / f"fail{len(errors)}", device="cpu", token=SECRET,
                                                 push=push, skip_check=True))
        errors.append(str(e.value))
    published.clear_faults()
    captured = capfd.readouterr()
    logged = caplog.text + "\n".join(repr(r.args) for r in caplog.records)
    assert caplog.records  # the capture really saw the client's debug logging
    for where, text in (("log", logged), ("stdout", captured.out), ("stderr", captured.err),
                        ("errors", "\n".join(errors))):
        assert SECRET not in text, where
    hf_home = Path(os.environ["HF_HOME"])
    assert files_containing(tmp_path, SECRET.encode()) == []  # outputs, GGUF, card, HF cache, temp leftovers
    assert files_containing(hf_home, SECRET.encode()) == [] and not (hf_home / "token").exists()


def test_cli_token_is_not_echoed_on_error(published: HubServer, tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "r.yml"
    recipe.write_text(RECIPE)
    published.inject("*", "forbidden", times=None)
    code = main(["run", str(recipe), str(tmp_path / "out"), "--token", SECRET, "--push", "alice/z"])
    out = capsys.readouterr()
    assert code == 2 and SECRET not in out.out + out.err and out.err.strip().startswith("error:")


# ---------------------------------------------------------------- Space mode: Hub repos only

LOCAL_NAMES = ["/etc", "/etc/passwd", "../x", "../../root", "./model", "~", "~/models/x", "~root",
               "file:///etc/passwd", "file:../x", "C:\\Windows", "..\\x"]


@pytest.mark.parametrize("name", LOCAL_NAMES)
@pytest.mark.parametrize("where", ["models", "base_model", "slices", "tokenizer_source"])
def test_space_mode_refuses_local_paths_everywhere(name: str, where: str) -> None:
    recipes = {
        "models": f"merge_method: linear\nparameters: {{weight: 1}}\nmodels:\n  - model: '{name}'\n",
        "base_model": f"merge_method: ties\nbase_model: '{name}'\nmodels:\n  - model: acme/a\n",
        "slices": f"merge_method: passthrough\nslices:\n  - sources:\n      - model: '{name}'\n"
                  "        layer_range: [0, 1]\n",
        "tokenizer_source": f"merge_method: linear\nmodels: [acme/a]\ntokenizer_source: '{name}'\n",
    }
    with pytest.raises(RecipeError) as e:
        parse_recipe(recipes[where], allow_local=False)
    text = str(e.value)
    assert "\n" not in text and ("local paths are not allowed" in text or "is not a Hub repo ID" in text), text


def test_space_mode_run_and_cli_refuse_local_models(tiny: dict[str, Path], tmp_path: Path, monkeypatch,
                                                    capsys) -> None:
    local = parse_recipe(f"merge_method: linear\nparameters: {{weight: 1}}\nmodels:\n  - model: {tiny['base']}\n")
    with pytest.raises(ModelError, match="local model folders are not allowed"):
        run(local, RunOptions(tmp_path / "out", device="cpu", allow_local=False))
    assert not (tmp_path / "out").exists()
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nparameters: {{weight: 1}}\nmodels:\n  - model: {tiny['base']}\n")
    monkeypatch.setenv("SPACE_ID", "someone/merger")
    code = main(["check", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2 and "local paths are not allowed" in err and err.count("\n") == 1


def test_hub_snapshots_stay_inside_the_cache(published: HubServer) -> None:
    """Downloaded model folders are the client's snapshot links, and every link resolves into the cache."""
    _, folder = mhub.fetch_model("acme/chat", token=SECRET)
    cache = mhub.hub_cache_dir().resolve()
    for path in folder.iterdir():
        assert path.resolve().is_relative_to(cache), path


def test_a_shard_named_outside_the_folder_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    from merger.sources import read_local_headers
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../chat/model.safetensors"}}))
    with pytest.raises(ModelError, match="outside the folder"):
        read_local_headers(evil)


# ---------------------------------------------------------------- remote code

MODELING = """from pathlib import Path
Path({marker!r}).write_text("remote code ran")
"""


def test_remote_code_is_never_imported_nor_downloaded(published: HubServer, tiny: dict[str, Path],
                                                      tmp_path: Path) -> None:
    marker = tmp_path / "REMOTE_CODE_RAN"
    evil = tmp_path / "evil-src"
    make_tiny_model(evil, perturb_from=tiny["base"], seed=9, perturb_scale=0.05)
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (evil / "config.json").write_text(json.dumps(config))
    for name in ("modeling_evil.py", "configuration_evil.py", "__init__.py"):
        (evil / name).write_text(MODELING.format(marker=str(marker)))
    published.upload_folder(evil, "eve/evil")
    recipe = parse_recipe(RECIPE.replace("acme/chat", "eve/evil"))
    from merger.check import check_recipe
    report = check_recipe(recipe, token=SECRET)
    assert report.ok and any("auto_map" in p.message and "ignored" in p.message for p in report.problems)
    result = run(recipe, RunOptions(tmp_path / "out", device="cpu", token=SECRET, gguf=("F16",)))
    assert not marker.exists()
    assert not any("evil" in name for name in sys.modules)
    for name in ("modeling_evil.py", "configuration_evil.py", "__init__.py"):
        assert published.stats.bytes_served.get(("eve/evil", name), 0) == 0  # never even downloaded
        assert not (result.out_dir / name).exists()
    assert "auto_map" not in json.loads((result.out_dir / "config.json").read_text())
    # a local folder with remote code: same (check and run read config + headers, never .py files)
    local = parse_recipe(f"merge_method: linear\nmodels:\n  - model: {evil}\n    parameters: {{weight: 1}}\n"
                         f"  - model: {tiny['base']}\n    parameters: {{weight: 1}}\n")
    assert check_recipe(local).ok
    run(local, RunOptions(tmp_path / "out2", device="cpu"))
    assert not marker.exists()


def test_an_unknown_architecture_needing_remote_code_is_refused_by_the_check(tiny: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    from merger.check import check_recipe
    odd = tmp_path / "odd"
    make_tiny_model(odd, perturb_from=tiny["base"], seed=8)
    config = json.loads((odd / "config.json").read_text())
    config.update(model_type="evilnet", architectures=["EvilForCausalLM"],
                  auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (odd / "config.json").write_text(json.dumps(config))
    report = check_recipe(parse_recipe(f"merge_method: linear\nparameters: {{weight: 1}}\nmodels:\n  - model: {odd}\n"))
    assert not report.ok and any("remote code is never executed" in p.message for p in report.problems)


def test_no_code_path_passes_trust_remote_code() -> None:
    sources = [p for d in ("merger", "quantize") for p in (REPO / d).rglob("*.py")] + [REPO / "app.py"]
    offenders = [str(p) for p in sources if p.exists() and re.search(r"trust_remote_code\s*=", p.read_text())]
    assert offenders == []


# ---------------------------------------------------------------- where a push may go

@pytest.mark.parametrize("token,repo,words", [
    ("hf_alice_write", "bob/stolen", "cannot publish under 'bob'"),
    ("hf_alice_write", "readers/x", "your role in 'readers' is 'read'"),
    ("hf_alice_read", "alice/x", "your token is read-only"),
    ("hf_scoped", "acme/x", "no 'write' permission on 'acme'"),
    (None, "alice/x", "publishing needs a Hugging Face token with write access"),
])
def test_push_only_where_the_token_may_write(published: HubServer, tmp_path: Path, token: str | None,
                                             repo: str, words: str) -> None:
    published.add_token("hf_scoped", "alice", "fineGrained", writable=["alice"])
    before = set(published.repos)
    with pytest.raises(HubError) as e:
        run(parse_recipe(RECIPE), RunOptions(tmp_path / "out", device="cpu", token=token, push=repo))
    assert words in str(e.value) and "\n" not in str(e.value)
    assert set(published.repos) == before and not (tmp_path / "out").exists()
    assert published.stats.requests["resolve_get"] == 0  # refused before any download


def test_push_never_overwrites_a_repo_the_tool_did_not_create(published: HubServer, tmp_path: Path) -> None:
    published.commit_files("alice/precious", {"README.md": b"# my own work\n"})
    with pytest.raises(HubError, match="was not made by this tool"):
        run(parse_recipe(RECIPE), RunOptions(tmp_path / "out", device="cpu", token=SECRET, push="alice/precious"))
    assert published.repo_files("alice/precious") == [".gitattributes", "README.md"]


@pytest.mark.parametrize("name", ["../x", "alice/../x", "alice/..", "alice/x/y", "/x", "alice/", "alice",
                                  "alice/" + "x" * 97, "x" * 97 + "/y", "alice/bad name", "alice/x--y",
                                  "alice/x.git", "alice/-x", "alice/.x", "alice/x.", "alice/x\n", "alice/é",
                                  "alice/x;rm -rf", "alice/x?y", "alice/%2e%2e"])
def test_output_repo_names_are_validated_before_anything(name: str, published: HubServer, tmp_path: Path) -> None:
    with pytest.raises(HubError, match="is not a valid repository name"):
        run(parse_recipe(RECIPE), RunOptions(tmp_path / "out", device="cpu", token=SECRET, push=name))
    assert sum(published.stats.requests.values()) == 0 and not (tmp_path / "out").exists()


def test_a_valid_repo_name_of_96_characters_is_accepted() -> None:
    mhub.validate_repo_id("alice/" + "x" * 96)


@pytest.mark.parametrize("name", ["acme/base\n@main", "acme/base@ma\nin", "acme/base\t@main", "acme\n/base"])
def test_hub_ids_with_control_characters_are_refused(name: str) -> None:
    """`$` in a regex also matches before a final newline: IDs must be matched whole (they go into URLs)."""
    with pytest.raises(RecipeError) as e:
        parse_recipe(f"merge_method: linear\nmodels: [{json.dumps(name)}]\n", allow_local=False)
    assert "\n" not in str(e.value)
