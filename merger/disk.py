"""Does a merge fit on the disk where it will run? Asked by the check, before anything is downloaded.

The check's estimate (parents to download, merged output, GGUF files) is compared with the free space
of the file systems that will hold them: the download cache for the parents, the output folder for the
rest (one sum when both are on the same file system). Parents already in the cache need no room.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from .check import ERROR, Estimates, Problem

# Ephemeral disk of the Space hardware (GB), from Hugging Face's hardware table, smallest first.
SPACE_DISKS = (("cpu-basic / t4-small", 50), ("t4-medium", 100), ("a10g-small", 110), ("a10g-large", 200),
               ("l4x1", 400))
DiskUsage = Callable[[Path], tuple[int, int]]  # (file-system id, free bytes) of an existing folder


def existing_parent(path: Path) -> Path:
    """The folder itself, or its nearest ancestor that exists (where it would be created)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def usage(path: Path) -> tuple[int, int]:
    """(device id, free bytes) of the file system holding `path` (or where it would be created)."""
    where = existing_parent(path)
    return os.stat(where).st_dev, shutil.disk_usage(where).free


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def disk_problem(estimates: Estimates, *, out_dir: Path, cache_dir: Path, cached: Callable[[], int] = lambda: 0,
                 on_space: bool = False, disk_usage: DiskUsage | None = None) -> Problem | None:
    """An error when the merge would fill the disk, with what to do; None when it fits.

    `cached()` (bytes of the parents already in the cache) is only asked when the plain estimate does not
    fit, since it costs a Hub request per model.
    """
    disk_usage = disk_usage or usage
    out_dev, out_free = disk_usage(out_dir)
    cache_dev, cache_free = disk_usage(cache_dir)
    written = estimates.output_bytes + estimates.gguf_bytes

    def shortfall(download: int) -> tuple[int, int, Path] | None:
        if out_dev == cache_dev:
            need = download + written
            return (need, out_free, out_dir) if need > out_free else None
        if download > cache_free:
            return download, cache_free, cache_dir
        return (written, out_free, out_dir) if written > out_free else None

    short = shortfall(estimates.download_bytes)
    if short is None:
        return None
    short = shortfall(max(0, estimates.download_bytes - cached()))
    if short is None:
        return None
    need, free, where = short
    message = (f"the merge needs about {_gb(need)} of disk at its peak (parents {_gb(estimates.download_bytes)}, "
               f"output {_gb(estimates.output_bytes)}, GGUF {_gb(estimates.gguf_bytes)}) but only {_gb(free)} "
               f"are free in {existing_parent(where)}; nothing was downloaded")
    saving = f"drop the GGUF types (saves {_gb(estimates.gguf_bytes)}), " if estimates.gguf_bytes else ""
    if on_space:
        bigger = [f"{name} {size} GB" for name, size in SPACE_DISKS if size * 1e9 > need]
        where_to = (f"duplicate this Space on hardware with more disk ({', '.join(bigger[:3])})" if bigger else
                    "run it on a machine with more disk")
        fix = f"{saving}merge fewer or smaller models, or {where_to}"
    else:
        fix = (f"free {_gb(need - free)} in {existing_parent(where)}, {saving}or put the download cache "
               "(HF_HOME) and the output folder on a larger disk")
    return Problem(ERROR, message, fix)
