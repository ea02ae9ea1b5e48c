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
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from merger.errors import GGUFError

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
