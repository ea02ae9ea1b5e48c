"""The Space as deployed: its image (read from the Dockerfile: no Docker engine here), its card, its deploy
script, and what keeps users apart and the disk from filling: per-user access checks before any cached
file is used, a download cache per job, the sign-in checked when a queued job starts, and the disk
estimate compared with the free space before anything is downloaded."""

from __future__ import annotations

import math
import re
import shlex
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from merger import hub as mhub
from merger.app import demo
from merger.app.deploy import card_sdk, deploy, main as deploy_main
from merger.app.runs import DONE, RunQueue
from merger.check import ERROR, GGUF_BITS, Estimates
from merger.disk import SPACE_DISKS, disk_problem
from merger.errors import HubError, MergerError, ModelError
from merger.pipeline import RunOptions, run
from merger.recipe import parse_recipe
from tests.hub_space import SPACE_KEY, SpaceHub
from tests.hubserver import HubServer, use_hub

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
CARD = ROOT / "space" / "README.md"
GATED_RECIPE = """models:
  - model: meta/gated-base
    parameters: {weight: 0.5}
  - model: acme/chat
    parameters: {weight: 0.5}
merge_method: linear
dtype: float32
"""


# ---------------------------------------------------------------- the image, read from the Dockerfile

def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """Instructions per stage as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    lines, buf = [], ""
    for raw in text.splitlines():
        s = raw.strip()
        if s.startswith("#") or (not s and not buf):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        lines.append(buf + s)
        buf = ""
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        op, _, arg = line.partition(" ")
        if op.upper() == "FROM":
            stages.append([])
        stages[-1].append((op.upper(), arg.strip()))
    return stages


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for op, arg in stage:
        if op == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(arg)))
    return env


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([\w.]+)", line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def card_meta() -> dict:
    return yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", CARD.read_text(encoding="utf-8"), re.DOTALL).group(1))


def test_the_image_compiles_in_one_stage_and_runs_on_another() -> None:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    assert len(stages) == 2
    build, final = stages
    assert re.fullmatch(r"\S+ AS build", build[0][1], re.IGNORECASE)
    build_runs = " ".join(arg for op, arg in build if op == "RUN")
    assert "build-essential" in build_runs and "cmake" in build_runs
    assert f"pip wheel --no-deps --wheel-dir /wheels \"llama-cpp-python=={pins()['llama-cpp-python']}\"" in build_runs
    final_runs = " ".join(arg for op, arg in final if op == "RUN")
    for tool in ("build-essential", "cmake", "python3-dev", "gcc", "g++"):
        assert tool not in final_runs.split(), f"{tool} must stay in the build stage"
    assert any(op == "COPY" and arg.startswith("--from=build") for op, arg in final)
    # llama.cpp is CPU-only by decision (see the Dockerfile's head): no CUDA kernels, so no driver stub.
    text = DOCKERFILE.read_text()
    assert "GGML_CUDA" not in env_of(build).get("CMAKE_ARGS", "") and "stubs/libcuda" not in text
    assert "-DGGML_NATIVE=OFF" in env_of(build)["CMAKE_ARGS"]


def test_the_image_runs_as_a_space_expects() -> None:
    final = dockerfile_stages(DOCKERFILE.read_text())[-1]
    ops = [op for op, _ in final]
    env = env_of(final)
    assert env["SYSTEM"] == "spaces"  # gradio's get_space() needs it; Docker Spaces do not set it
    assert env["HOME"] == "/home/user"
    assert env["GRADIO_ANALYTICS_ENABLED"] == "False" and env["HF_HUB_DISABLE_TELEMETRY"] == "1"
    user_at, workdir_at = ops.index("USER"), ops.index("WORKDIR")
    assert dict(final)["USER"] == "user" and user_at < workdir_at  # the app folder is the user's
    assert dict(final)["WORKDIR"] == "/home/user/app"
    created = next(i for i, (op, arg) in enumerate(final) if op == "RUN" and "useradd -m -u 1000 user" in arg)
    assert created < user_at
    assert dict(final)["EXPOSE"] == str(card_meta()["app_port"]) == str(demo.PORT)
    assert dict(final)["CMD"] == '["python", "app.py"]'
    app_copy = next(i for i, (op, arg) in enumerate(final) if op == "COPY" and arg.endswith(". /home/user/app"))
    assert "--chown=user:user" in final[app_copy][1]


def test_the_image_installs_the_pinned_versions_then_the_converter() -> None:
    final = dockerfile_stages(DOCKERFILE.read_text())[-1]
    runs = [(i, arg) for i, (op, arg) in enumerate(final) if op == "RUN"]
    install = next(i for i, arg in runs if "pip install -r /tmp/requirements.txt" in arg)
    text = dict(runs)[install]
    assert f"torch=={pins()['torch']} --index-url https://download.pytorch.org/whl/cu126" in text
    assert text.index("torch==") < text.index("llama_cpp_python-") < text.index("-r /tmp/requirements.txt")
    converter = next(i for i, arg in runs if arg == "python -m quantize.upstream install")
    app_copy = next(i for i, (op, arg) in enumerate(final) if op == "COPY" and arg.endswith(". /home/user/app"))
    assert install < app_copy < converter


def test_gradio_sees_a_space_only_with_the_images_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradio.utils import get_space

    env = env_of(dockerfile_stages(DOCKERFILE.read_text())[-1])
    monkeypatch.setenv("SPACE_ID", "alice/llm-merger")  # what the Space injects at run time
    monkeypatch.delenv("SYSTEM", raising=False)
    assert get_space() is None  # the crash of the old image: the mocked login routes, then whoami() fails
    monkeypatch.setenv("SYSTEM", env["SYSTEM"])
    assert get_space() == "alice/llm-merger"
    settings = demo.settings_from_env({**env, "SPACE_ID": "alice/llm-merger"})
    assert settings.space and settings.host == "0.0.0.0" and settings.port == 7860


def test_the_app_makes_gradio_see_the_space_whatever_the_image() -> None:
    env = {"SPACE_ID": "alice/llm-merger"}
    demo.space_environment(env)
    assert env["SYSTEM"] == "spaces"
    local: dict[str, str] = {}
    demo.space_environment(local)
    assert local == {}  # off a Space gradio keeps its local (mocked) sign-in
    other = {"SPACE_ID": "alice/llm-merger", "SYSTEM": "something-else"}
    demo.space_environment(other)
    assert other["SYSTEM"] == "something-else"  # an explicit setting is left alone


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", "outputs", "demo_models", ".git", "tests/artifacts"):
        assert path in ignored


# ---------------------------------------------------------------- the card

def test_card_asks_for_the_scopes_the_app_uses() -> None:
    meta = card_meta()
    assert meta["sdk"] == "docker" and meta["hf_oauth"] is True
    assert {"read-repos", "gated-repos", "write-repos", "manage-repos", "jobs"} <= set(meta["hf_oauth_scopes"])
    assert meta["hf_oauth_expiration_minutes"] == 480
    text = CARD.read_text(encoding="utf-8")
    assert "consent screen" in text and "tick" in text  # organisations must be ticked to be used
    assert "a T4 works" not in text  # the old, wrong advice


def test_card_hardware_table_matches_the_disks_and_the_estimate() -> None:
    """Each row: the disk of that hardware (merger.disk.SPACE_DISKS) and the largest fp16 merge with F16 +
    Q4_K_M GGUF files, from peak = (parents + 1) * 2 bytes * params + 1.3 * 2 bytes * params."""
    text = CARD.read_text(encoding="utf-8")
    rows = re.findall(r"^\| ([^|]+) \| (\d+) GB \| [^|]+ \| ~(\d+)B / ~(\d+)B", text, re.MULTILINE)
    assert len(rows) == len(SPACE_DISKS)
    gguf_share = 1.3  # the F16 file (1x) + Q4_K_M (4.85 of 16 bits per weight, merger.check.GGUF_BITS)
    assert abs(gguf_share - (1 + GGUF_BITS["Q4_K_M"] / 16)) < 0.01
    for (name, disk, two, three), (known_name, known_disk) in zip(rows, SPACE_DISKS):
        assert int(disk) == known_disk and known_name.split()[0] in name
        assert int(two) == math.floor(known_disk / (2 * (2 + 1 + gguf_share)))
        assert int(three) == math.floor(known_disk / (2 * (3 + 1 + gguf_share)))
    assert card_meta()["suggested_hardware"] == "t4-medium"
    assert 50 < 2 * 7.24 * (3 + 1 + gguf_share) < 100  # three 7B parents (~77 GB): t4-medium, not a T4-small


# ---------------------------------------------------------------- gated parents: access per user

@pytest.fixture
def gated(hub: HubServer, tiny: dict[str, Path]) -> HubServer:
    """meta/gated-base: gated, alice granted, bob not; acme/chat public."""
    hub.upload_folder(tiny["base"], "meta/gated-base", gated="manual", allowed_users={"alice"})
    hub.upload_folder(tiny["chat"], "acme/chat")
    return hub


def test_a_gated_model_in_the_shared_cache_is_not_served_to_a_user_without_access(gated: HubServer) -> None:
    model, folder = mhub.fetch_model("meta/gated-base", token="hf_alice_write")
    assert (folder / "model.safetensors").is_file() and model.access == "gated (granted)"
    served = gated.stats.total_bytes("meta/gated-base")
    pinned = f"meta/gated-base@{model.sha}"  # a read pinned to the commit is the one a shared cache answers
    for token in ("hf_bob_write", None):
        with pytest.raises(HubError) as e:
            mhub.fetch_model(pinned, token=token)
        assert "is gated: accept its licence" in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(HubError):
            mhub.fetch_model_metadata(pinned, token=token)  # the check's config and header reads too
        with pytest.raises(HubError):
            demo.layer_count(pinned, token)  # the passthrough picker's config read too
    assert gated.stats.total_bytes("meta/gated-base") == served  # nothing more left the Hub either
    report = demo.check_report(demo.Settings(False, "127.0.0.1", 7860, Path("/nonexistent/out"), Path("/x")),
                               GATED_RECIPE.replace("meta/gated-base", pinned), (), "hf_bob_write")
    assert not report.ok and any("gated" in p.message for p in report.problems if p.severity == ERROR)
    assert mhub.fetch_model(pinned, token="hf_alice_write")[1] == folder  # the granted user still gets it


def test_a_job_downloads_into_its_own_cache_which_goes_with_the_job(gated: HubServer, tmp_path: Path) -> None:
    shared = mhub.hub_cache_dir()
    with mhub.job_cache(tmp_path / "job" / "hub-cache") as own:
        assert mhub.hub_cache_dir() == own
        _, folder = mhub.fetch_model("meta/gated-base", token="hf_alice_write")
    assert own in folder.parents and mhub.hub_cache_dir() == shared
    assert not any(shared.glob("models--meta--gated-base")) if shared.exists() else True


def test_a_space_job_leaves_no_parent_on_disk(gated: HubServer) -> None:
    settings = demo.Settings(True, "127.0.0.1", 7860, Path("/nonexistent/out"), Path("/nonexistent/demo"))
    queue = RunQueue()
    job = queue.new_job()
    request = demo.job_request(settings, GATED_RECIPE, "alice/merged", private=True, publish=True, quants=(),
                               token="hf_alice_write", job_id=job.job_id, expires_at=time.time() + 3600)
    assert request.cache_dir is not None and request.job_dir in request.cache_dir.parents
    job.start(request.recipe, request.options, job_dir=request.job_dir, keep=request.keep,
              cache_dir=request.cache_dir)
    assert job.wait(120)
    snap = job.snapshot()
    assert snap.status == DONE, snap.error
    assert "alice/merged" in gated.repos
    assert not request.job_dir.exists()  # output and downloaded parents removed after the push
    shared = mhub.hub_cache_dir()
    assert not (shared.exists() and any(shared.glob("models--*")))  # nothing went to the shared cache


def test_the_sign_in_is_checked_when_a_queued_job_starts(hub: HubServer) -> None:
    now = time.time()
    with pytest.raises(HubError, match="not signed in"):
        demo.ensure_signed_in(None, None)
    with pytest.raises(HubError, match="expired while the merge waited in the queue"):
        demo.ensure_signed_in("hf_alice_write", now - 1)
    with pytest.raises(HubError, match="expires in 4 minute"):
        demo.ensure_signed_in("hf_alice_write", now + 299, now=now)
    with pytest.raises(HubError, match="expired while the merge waited in the queue"):
        demo.ensure_signed_in("hf_revoked_token", now + 3600)  # the Hub answers 401
    demo.ensure_signed_in("hf_alice_write", now + 3600)
    settings = demo.Settings(True, "127.0.0.1", 7860, Path("/nonexistent/out"), Path("/nonexistent/demo"))
    whoami = hub.stats.requests["whoami"]
    with pytest.raises(HubError, match="expired") as e:
        demo.job_request(settings, GATED_RECIPE, "alice/merged", private=True, publish=True, quants=(),
                         token="hf_alice_write", job_id="x", expires_at=now - 60)
    assert "\n" not in str(e.value) and hub.stats.requests["whoami"] == whoami  # refused without asking


def test_an_oauth_token_expired_in_the_queue_is_reported_in_one_line(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with SpaceHub() as space_hub:
        use_hub(space_hub, monkeypatch, tmp_path / "hf")
        space_hub.register_client("cid", "secret", "https://example/login/callback")
        from tests.hub_space import _Code

        token, access = space_hub._issue(_Code("cid", "alice", frozenset({"openid", "write-repos"}), frozenset(),
                                               "https://example/login/callback", None, time.time() + 60))
        demo.ensure_signed_in(token, access.expires_at)
        space_hub.expire_tokens("alice")  # the Hub side expired it (gradio's copy still says valid)
        with pytest.raises(HubError, match="sign in again"):
            demo.ensure_signed_in(token, access.expires_at)


# ---------------------------------------------------------------- disk

def estimates(download: int, output: int, gguf: int) -> Estimates:
    return Estimates(download, output, gguf, download + output + gguf, 0, 0)


def test_disk_problem_compares_the_estimate_with_the_free_space(tmp_path: Path) -> None:
    seven_b = 14_480_000_000  # a 7.24B model in fp16
    three_parents = estimates(3 * seven_b, seven_b, int(1.3 * seven_b))  # ~77 GB
    same_disk = lambda free: (lambda path: (1, free))  # noqa: E731
    problem = disk_problem(three_parents, out_dir=tmp_path, cache_dir=tmp_path, on_space=True,
                           disk_usage=same_disk(int(50e9)))
    assert problem is not None and problem.severity == ERROR
    assert "about 76.7 GB" in problem.message and "only 50.0 GB are free" in problem.message
    assert "nothing was downloaded" in problem.message
    assert "t4-medium 100 GB" in problem.fix and "cpu-basic" not in problem.fix
    assert "drop the GGUF types (saves 18.8 GB)" in problem.fix
    assert disk_problem(three_parents, out_dir=tmp_path, cache_dir=tmp_path, disk_usage=same_disk(int(100e9))) is None
    # parents already cached need no room; the cache is only asked when the plain estimate does not fit
    asked = []
    cached = lambda: asked.append(1) or 3 * seven_b  # noqa: E731
    assert disk_problem(three_parents, out_dir=tmp_path, cache_dir=tmp_path, cached=cached,
                        disk_usage=same_disk(int(40e9))) is None
    assert asked == [1]
    # separate file systems: the parents are weighed against the cache's, the rest against the output's
    two_disks = lambda path: (2, int(30e9)) if "cache" in str(path) else (3, int(500e9))  # noqa: E731
    problem = disk_problem(three_parents, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                           disk_usage=two_disks)
    assert problem is not None and "only 30.0 GB are free" in problem.message
    assert "HF_HOME" in problem.fix  # off a Space: the local fix


def test_a_merge_that_does_not_fit_is_refused_before_downloading(gated: HubServer, tmp_path: Path,
                                                                 tiny: dict[str, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import merger.disk

    monkeypatch.setattr(merger.disk, "usage", lambda path: (1, 1000))
    recipe = parse_recipe(GATED_RECIPE)
    with pytest.raises(ModelError) as e:
        run(recipe, RunOptions(tmp_path / "out", device="cpu", token="hf_alice_write", allow_local=False))
    line = str(e.value)
    assert line.startswith("pre-flight check failed: the merge needs about") and "\n" not in line
    assert "duplicate this Space on hardware with more disk" in line
    weights = (tiny["base"] / "model.safetensors").stat().st_size + (tiny["chat"] / "model.safetensors").stat().st_size
    assert gated.stats.total_bytes() < weights / 10  # configs and safetensors headers only
    assert not (tmp_path / "out").exists()
    settings = demo.Settings(True, "127.0.0.1", 7860, tmp_path / "outputs", tmp_path / "demo")
    report = demo.check_report(settings, GATED_RECIPE, ("Q4_K_M",), "hf_alice_write")
    assert not report.ok and "free" in demo.render_check(report)


# ---------------------------------------------------------------- deploy

@pytest.fixture
def space_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SpaceHub]:
    with SpaceHub() as server:
        use_hub(server, monkeypatch, tmp_path / "hf_home")
        yield server


def test_deploy_creates_the_space_with_the_card_as_readme(space_hub: SpaceHub) -> None:
    url = deploy("alice/llm-merger", token="hf_alice_write")
    assert url == f"{space_hub.url}/spaces/alice/llm-merger"
    assert space_hub.space_infos["alice/llm-merger"].sdk == "docker"
    files = space_hub.space_files("alice/llm-merger")
    assert files["README.md"] == CARD.read_bytes()
    assert files["Dockerfile"] == DOCKERFILE.read_bytes() and files["app.py"] == (ROOT / "app.py").read_bytes()
    assert "merger/app/deploy.py" in files and not any(p.startswith((".venv/", "outputs/")) for p in files)
    from huggingface_hub import HfApi

    info = HfApi(endpoint=space_hub.url, token="hf_alice_write").space_info("alice/llm-merger")
    assert info.sdk == "docker"


def test_deploy_updates_with_another_card_and_removes_stale_files(space_hub: SpaceHub, tmp_path: Path) -> None:
    deploy("alice/llm-merger", token="hf_alice_write")
    space_hub.commit_files(SPACE_KEY + "alice/llm-merger", {"old_module.py": b"print('gone')\n"})
    card = tmp_path / "zerogpu.md"
    card.write_text("---\ntitle: LLM Merger (ZeroGPU)\nsdk: gradio\nsdk_version: 6.31.0\napp_file: app.py\n"
                    "hf_oauth: true\n---\n\n# ZeroGPU card\n", encoding="utf-8")
    deploy("alice/llm-merger", card=card, token="hf_alice_write")
    files = space_hub.space_files("alice/llm-merger")
    assert files["README.md"] == card.read_bytes() and "old_module.py" not in files
    assert ".gitattributes" in files  # the Hub's own file survives delete_patterns="*"
    assert card_sdk(card.read_text()) == "gradio"
    assert files["requirements.txt"] == (ROOT / "requirements.txt").read_bytes()  # no requirements beside it


def test_deploy_of_the_zerogpu_card_brings_its_requirements(space_hub: SpaceHub) -> None:
    card = ROOT / "space" / "zerogpu" / "README.md"
    deploy("alice/llm-merger-zero", card=card, token="hf_alice_write")
    assert space_hub.space_infos["alice/llm-merger-zero"].sdk == "gradio"
    files = space_hub.space_files("alice/llm-merger-zero")
    assert files["README.md"] == card.read_bytes()
    assert files["requirements.txt"] == (ROOT / "space" / "zerogpu" / "requirements.txt").read_bytes()
    assert files["space/zerogpu/requirements.txt"] == files["requirements.txt"] and files["app.py"]


def test_deploy_refusals_are_one_line(space_hub: SpaceHub, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(HubError, match="may not create or write Spaces under 'alice'"):
        deploy("alice/llm-merger", token="hf_bob_write")
    space_hub.payment_required.add("bob")
    with pytest.raises(HubError, match="paid plan or a payment method to create a docker Space"):
        deploy("bob/llm-merger", token="hf_bob_write")
    bad = tmp_path / "card.md"
    bad.write_text("# no front matter\n")
    assert deploy_main(["alice/llm-merger", "--card", str(bad), "--token", "hf_alice_write"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "front matter" in err and err.count("\n") == 1
    with pytest.raises(MergerError, match="is not a valid repository name"):
        deploy("not a repo", token="hf_alice_write")
    assert deploy_main(["alice/x", "--card", str(tmp_path / "missing.md")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not any(k.startswith(SPACE_KEY) for k in space_hub.repos)


def test_publishing_into_an_org_not_ticked_says_to_tick_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with SpaceHub() as server:
        use_hub(server, monkeypatch, tmp_path / "hf")
        from tests.hub_space import _Code

        token, _ = server._issue(_Code("c", "alice", frozenset({"openid", "write-repos", "manage-repos"}),
                                       frozenset(), "x", None, time.time() + 60))
        with pytest.raises(HubError) as e:
            mhub.check_write_access("acme/merged", token=token)  # alice is in acme, but did not tick it
        assert "ticking 'acme' on the consent screen" in str(e.value)
        token, _ = server._issue(_Code("c", "alice", frozenset({"openid", "write-repos", "manage-repos"}),
                                       frozenset({"acme"}), "x", None, time.time() + 60))
        assert mhub.check_write_access("acme/merged", token=token) == "alice"


def test_gated_parents_need_the_gated_repos_scope(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  tiny: dict[str, Path]) -> None:
    with SpaceHub() as server:
        use_hub(server, monkeypatch, tmp_path / "hf")
        server.upload_folder(tiny["base"], "meta/gated-base", gated="manual", allowed_users={"alice"})
        from tests.hub_space import _Code

        def token_with(*scopes: str) -> str:
            return server._issue(_Code("c", "alice", frozenset({"openid", *scopes}), frozenset(), "x", None,
                                       time.time() + 60))[0]

        with pytest.raises(HubError, match="is gated"):
            mhub.resolve("meta/gated-base", token=token_with("read-repos"))  # read-repos: own repos only
        assert mhub.resolve("meta/gated-base", token=token_with("read-repos", "gated-repos")).gated

