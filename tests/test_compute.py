"""The compute layer's pure parts: hardware choice and estimates (numbers worked out by hand below), the
progress-line protocol, the packaging (a wheel built from pyproject.toml, offline), the card's reproduce
section, and the ZeroGPU Space card and requirements."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from huggingface_hub import JobHardwareInfo

from merger.compute.flavors import Flavor, choose_flavor, parse_size
from merger.compute.protocol import EVENT_PREFIX, LinePrinter, parse_line
from merger.compute.resources import GB, Needs, timeout_seconds
from merger.errors import MergerError
from merger.pipeline import Event
from tests.hubjobs import HARDWARE

ROOT = Path(__file__).resolve().parents[1]
FLAVORS = [Flavor.from_info(JobHardwareInfo(**h)) for h in HARDWARE]
EMBED = 128256 * 8192  # a Llama-3-70B embedding: the largest tensor
# Three 70B parents merged with TIES (141 GB each and out): the check's estimates as requirements.
SEVENTY = Needs(ram_bytes=3 * GB + EMBED * 4 * 5, disk_bytes=int(1.1 * 141e9), gpu_bytes=EMBED * 4 * 5,
                read_bytes=int(3 * 141e9), output_bytes=int(141e9), gguf_bytes=0, parents_on_disk=int(3 * 141e9))


def test_flavors_are_read_from_the_hub_listing() -> None:
    l4 = next(f for f in FLAVORS if f.name == "l4x1")
    assert (l4.cores, l4.ram_bytes, l4.disk_bytes, l4.gpus, l4.gpu_bytes) == (8, 30 * GB, 400 * GB, 1, 24 * GB)
    assert l4.usd_per_second == pytest.approx(0.013333 / 60)
    assert parse_size("16 GB") == 16 * GB and parse_size("2 GiB") == 2 * 2**30 and parse_size("N/A") is None


def test_the_cheapest_flavor_that_fits_with_time_cost_and_reasons() -> None:
    choice = choose_flavor(FLAVORS, SEVENTY)
    assert choice.flavor.name == "l4x1"
    # 120 s start + 423 GB read at 200 MB/s + 141 GB written at 300 MB/s + 141 GB uploaded at 100 MB/s
    seconds = 120 + 2115 + 470 + 1410
    assert choice.seconds == pytest.approx(seconds)
    assert choice.usd == pytest.approx(seconds / 60 * 0.013333)
    assert choice.timeout == 3 * 3600 + 41 * 60 == timeout_seconds(seconds)  # 3 x 4115 + 900 = 13245 -> 221 min
    assert [f.name for f, _ in choice.rejected] == ["cpu-basic", "cpu-upgrade", "t4-small"]
    assert dict((f.name, why) for f, why in choice.rejected)["t4-small"] == (
        "RAM 15.0 GB < 24.0 GB needed", "disk 50.0 GB < 155.1 GB needed", "GPU memory 16.0 GB < 21.0 GB needed")


def test_evaluation_and_verification_forward_passes_are_in_the_estimate() -> None:
    from types import SimpleNamespace

    from merger.check import Estimates
    from merger.compute.resources import needs_from_report, run_seconds

    e = Estimates(download_bytes=3 * GB, output_bytes=1 * GB, gguf_bytes=2 * GB, disk_bytes=6 * GB,
                  merge_ram_bytes=GB, gguf_ram_bytes=GB, merge_vram_bytes=GB)
    report = SimpleNamespace(estimates=e)
    with_eval, without = needs_from_report(report), needs_from_report(report, evaluate=False)
    assert with_eval.forward_bytes == (1 + 3) * GB + (1 + 2) * GB  # merge + parents; merge + GGUF files
    assert without.forward_bytes == (1 + 2) * GB  # GGUF verification stays
    # at 5 MB/s per core on 2 cores: 4 GB more of forwards is 400 s; on a GPU at 1 GB/s, 4 s
    assert run_seconds(with_eval, cores=2, gpu=False) - run_seconds(without, cores=2, gpu=False) == \
        pytest.approx(400)
    assert run_seconds(with_eval, cores=8, gpu=True) - run_seconds(without, cores=8, gpu=True) == pytest.approx(4)


def test_the_readme_shows_what_the_check_prints() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for line in choose_flavor(FLAVORS, SEVENTY).lines():
        assert f"    {line}\n" in readme


def test_a_chosen_flavor_must_fit_and_exist() -> None:
    with pytest.raises(MergerError, match=r"flavor t4-small cannot run this merge \(RAM 15.0 GB < 24.0 GB"):
        choose_flavor(FLAVORS, SEVENTY, wanted="t4-small")
    with pytest.raises(MergerError, match="unknown Jobs flavor 'h100'; choose one of cpu-basic, cpu-upgrade"):
        choose_flavor(FLAVORS, SEVENTY, wanted="h100")
    assert choose_flavor(FLAVORS, SEVENTY, wanted="a100-large").flavor.name == "a100-large"
    huge = Needs(**{**vars(SEVENTY), "ram_bytes": 500 * GB})
    with pytest.raises(MergerError, match="no Hugging Face Jobs flavor can hold this merge"):
        choose_flavor(FLAVORS, huge)


def test_progress_lines_round_trip(tmp_path: Path) -> None:
    import io

    stream = io.StringIO()
    printer = LinePrinter(stream)
    events = [Event("download", 0.25, "org/a", 10, 40), Event("download", 0.3, "skipped: too soon"),
              Event("merge", 1.0, "model.norm.weight", 5, 5)]
    for e in events:
        printer(e)
    lines = stream.getvalue().splitlines()
    assert [parse_line(line) for line in lines] == [events[0], events[2]]  # throttled within a stage
    assert parse_line("plain log line") is None and parse_line(EVENT_PREFIX + "{not json") is None


def test_the_wheel_installs_both_commands_and_all_packages(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("merger", "quantize"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("llm_merger-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "merger = merger.__main__:main" in entry_points and "quantize = quantize.__main__:main" in entry_points
    assert {"merger/compute/jobs.py", "merger/compute/zerogpu.py", "merger/app/gallery/slerp.yml",
            "merger/methods/__init__.py", "quantize/llama.py", "merger/eval/eval_text.md", "merger/finish.py",
            "merger/remote.py"} <= names
    assert not any(n.startswith("tests/") for n in names)


def test_card_reproduces_with_this_tool_and_mergekit(monkeypatch: pytest.MonkeyPatch) -> None:
    from mergekit.merge_methods.registry import registered_methods

    from merger.card import MERGEKIT_METHODS, install_command

    assert MERGEKIT_METHODS == {m.spec.name for m in registered_methods()}
    assert install_command({"SPACE_ID": "alice/llm-merger"}) == \
        'pip install "llm-merger @ git+https://huggingface.co/spaces/alice/llm-merger"'
    assert install_command({}) == "pip install .  # in a checkout of llm-merger"


def test_zerogpu_space_card_and_requirements() -> None:
    text = (ROOT / "space" / "zerogpu" / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL).group(1))
    assert front["sdk"] == "gradio" and front["sdk_version"] == "6.31.0" and front["python_version"] == "3.12"
    assert front["app_file"] == "app.py" and front["hf_oauth"] is True and "jobs" in front["hf_oauth_scopes"]
    reqs = (ROOT / "space" / "zerogpu" / "requirements.txt").read_text(encoding="utf-8").splitlines()
    pins = dict(line.split("==") for line in reqs if "==" in line and not line.startswith("#"))
    assert pins["torch"] in {"2.8.0", "2.9.1", "2.10.0", "2.11.0"}  # ZeroGPU's supported list
    assert pins["gradio[oauth]"] == front["sdk_version"] and "spaces" in pins
    assert "--extra-index-url https://download.pytorch.org/whl/cu128" in reqs  # CUDA >= 12.8 for Blackwell
