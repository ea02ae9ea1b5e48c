"""llama.cpp's own converter (`convert_hf_to_gguf.py`), installed at set-up time, never fetched at run time.

The llama-cpp-python source package of the installed version vendors llama.cpp with its converter, the
`conversion/` package it imports and its own `gguf-py/`. `python -m quantize.upstream install` (run by
`make`, and by the Docker image build) extracts exactly those files into `<venv>/share/llama.cpp-convert/`;
`converter_dir()` finds them, or says how to install them. The tests use the converter as the GGUF
reference; the export uses it for architectures the streaming converter does not cover.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from merger.errors import CancelledError, GGUFError

ENV_VAR = "MERGER_LLAMA_CPP_CONVERTER"  # overrides the folder (e.g. a llama.cpp checkout)
CONVERTER = "convert_hf_to_gguf.py"
_KEEP = (CONVERTER, "conversion/", "gguf-py/")


def default_dir() -> Path:
    return Path(sys.prefix) / "share" / "llama.cpp-convert"


def converter_dir() -> Path:
    """The folder holding convert_hf_to_gguf.py for the installed llama-cpp-python version."""
    folder = Path(os.environ.get(ENV_VAR) or default_dir())
    if not (folder / CONVERTER).is_file():
        raise GGUFError(f"llama.cpp's converter is not installed in {folder}: run "
                        f"'{sys.executable} -m quantize.upstream install' (make run/test do this)")
    return folder


def _llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def _download_sdist(ver: str, folder: Path) -> Path:
    """The sdist from the package index's JSON simple API (PEP 691), checked against its sha256.
    (`pip download` would also build the package's metadata: a minute or more for nothing.)"""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    name = f"llama_cpp_python-{ver}.tar.gz"
    try:
        req = urllib.request.Request(f"{index}/llama-cpp-python/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            files = json.load(resp)["files"]
        entry = next((f for f in files if f["filename"] == name), None)
        if entry is None:
            raise GGUFError(f"{index} lists no {name}")
        url = urllib.parse.urljoin(f"{index}/llama-cpp-python/", entry["url"])
        digest = hashlib.sha256()
        path = folder / name
        with urllib.request.urlopen(url, timeout=600) as resp, open(path, "wb") as out:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        expected = entry["hashes"]["sha256"]
    except (OSError, ValueError, KeyError) as exc:
        raise GGUFError(f"could not download {name} from {index}: {exc}") from None
    if digest.hexdigest() != expected:
        raise GGUFError(f"{name} from {index} does not match the index's sha256; try again")
    return path


def install(target: Path | None = None) -> Path:
    """Download the llama-cpp-python sdist of the installed version and extract the converter files into
    `target`. Idempotent: a folder stamped with the same version is kept."""
    target = target or default_dir()
    ver = _llama_cpp_version()
    stamp = target / ".version"
    if stamp.is_file() and stamp.read_text().strip() == ver and (target / CONVERTER).is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        archive = _download_sdist(ver, Path(tmp))
        prefix = f"{archive.name[:-len('.tar.gz')]}/vendor/llama.cpp/"
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        with tarfile.open(archive) as tar:
            members = []
            for m in tar.getmembers():
                rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
                if rel and (rel == CONVERTER or rel.startswith(_KEEP[1:])):
                    m.name = rel
                    members.append(m)
            tar.extractall(staging, members=members, filter="data")
    if not (staging / CONVERTER).is_file():
        raise GGUFError(f"llama-cpp-python {ver}'s source package has no {CONVERTER}")
    (staging / ".version").write_text(ver + "\n")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def run_converter(model_dir: str | Path, out_path: str | Path, outtype: str, *, name: str | None = None,
                  cancel: Callable[[], bool] | None = None) -> Path:
    """Convert a local model folder with llama.cpp's convert_hf_to_gguf.py, in a subprocess of this Python.

    Written under a hidden name and moved to `out_path` when complete; a failure or `cancel()` stops the
    converter and leaves nothing behind. The converter's log goes to a temporary file; a failure is
    reported as its last error line. The converter derives general.* metadata (base name, version,
    fine-tune) from the folder's name, so it reads the files through a folder named `name`, not through
    the hidden temporary folder a merge writes into.
    """
    folder, model_dir, out_path = converter_dir(), Path(model_dir).resolve(), Path(out_path)
    with tempfile.TemporaryDirectory() as views:
        view = Path(views) / (name or model_dir.name)
        view.mkdir()
        for file in model_dir.iterdir():
            if file.is_file() and file.suffix != ".gguf" and not file.name.startswith("."):
                (view / file.name).symlink_to(file)
        return _run_converter(folder, view, out_path, outtype, name, cancel)


def _run_converter(folder: Path, model_dir: Path, out_path: Path, outtype: str, name: str | None,
                   cancel: Callable[[], bool] | None) -> Path:
    tmp = out_path.with_name(f".{out_path.name}.partial")
    root = str(Path(__file__).resolve().parents[1])  # so that the driver imports this project's quantize
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "quantize.llama_cpp_driver", str(folder), str(model_dir), "--outtype", outtype,
           "--outfile", str(tmp), *(["--model-name", name] if name else [])]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
        try:
            while proc.poll() is None:
                if cancel is not None and cancel():
                    raise CancelledError("GGUF export cancelled; its partial files were removed")
                time.sleep(0.1)
            if proc.returncode != 0 or not tmp.is_file():
                log.seek(0)
                lines = [line.strip() for line in log.read().splitlines() if line.strip()]
                marked = [line.split("GGUF-EXPORT-ERROR: ", 1)[1] for line in lines if "GGUF-EXPORT-ERROR: " in line]
                why = (marked or lines or [f"exit code {proc.returncode}"])[-1]
                raise GGUFError(f"llama.cpp's converter could not export {model_dir.name}: {why[:300]}")
            tmp.replace(out_path)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            tmp.unlink(missing_ok=True)
    return out_path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["install"] or len(args) > 2:
        print("usage: python -m quantize.upstream install [FOLDER]", file=sys.stderr)
        return 2
    try:
        where = install(Path(args[1]) if len(args) == 2 else None)
    except GGUFError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"llama.cpp converter {_llama_cpp_version()} in {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
