"""Choosing the Hugging Face Jobs hardware for a merge: the cheapest flavor whose RAM, disk and GPU
memory fit, with the estimated time and cost, and why each cheaper flavor does not fit."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import MergerError
from .resources import GB, Needs, run_seconds, timeout_seconds

_SIZE = re.compile(r"^\s*([\d.]+)\s*([KMGT]i?B)\s*$", re.IGNORECASE)
_UNITS = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SECONDS_PER_UNIT = {"second": 1, "minute": 60, "hour": 3600}


def parse_size(text: str | None) -> int | None:
    """'16 GB' -> bytes; None for what the Hub leaves unspecified ('N/A')."""
    m = _SIZE.match(text or "")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()]) if m else None


@dataclass(frozen=True)
class Flavor:
    """One Jobs hardware option, in numbers."""

    name: str
    pretty_name: str
    cores: int
    ram_bytes: int
    disk_bytes: int | None  # None: the Hub does not say
    gpus: int
    gpu_bytes: int  # per GPU (a merge uses one)
    usd_per_second: float

    @classmethod
    def from_info(cls, info: Any) -> Flavor:
        """From huggingface_hub's JobHardwareInfo."""
        acc = info.accelerator
        gpus = int(acc.quantity) if acc is not None and str(acc.quantity).isdigit() else (1 if acc else 0)
        total_vram = parse_size(acc.vram) if acc is not None else 0
        cores = re.match(r"\s*(\d+)", info.cpu or "")
        per = _SECONDS_PER_UNIT.get(str(info.unit_label).lower().rstrip("s"), 60)
        return cls(info.name, info.pretty_name, int(cores.group(1)) if cores else 1, parse_size(info.ram) or 0,
                   parse_size(info.ephemeral_storage), gpus, (total_vram or 0) // max(gpus, 1),
                   float(info.unit_cost_usd) / per)

    def shortfalls(self, needs: Needs) -> list[str]:
        """Why this flavor cannot hold the merge (empty when it can)."""
        out = []
        if self.ram_bytes < needs.ram_bytes:
            out.append(f"RAM {_gb(self.ram_bytes)} < {_gb(needs.ram_bytes)} needed")
        if self.disk_bytes is not None and self.disk_bytes < needs.disk_bytes:
            out.append(f"disk {_gb(self.disk_bytes)} < {_gb(needs.disk_bytes)} needed")
        if self.gpus and self.gpu_bytes < needs.gpu_bytes:
            out.append(f"GPU memory {_gb(self.gpu_bytes)} < {_gb(needs.gpu_bytes)} needed")
        return out


@dataclass(frozen=True)
class FlavorChoice:
    """The chosen flavor, its estimates, and the cheaper ones that do not fit (with reasons)."""

    flavor: Flavor
    seconds: float
    usd: float
    timeout: int
    rejected: tuple[tuple[Flavor, tuple[str, ...]], ...]

    def lines(self) -> list[str]:
        """The report's lines, as the check shows them."""
        f = self.flavor
        gpu = f"{f.gpus}x {_gb(f.gpu_bytes)} GPU, " if f.gpus else ""
        out = [f"Hugging Face Jobs flavor: {f.name} ({f.pretty_name}: {f.cores} vCPU, {gpu}{_gb(f.ram_bytes)} RAM"
               + (f", {_gb(f.disk_bytes)} disk)" if f.disk_bytes is not None else ")"),
               f"  estimated time {_duration(self.seconds)}, estimated cost {usd(self.usd)} "
               f"({usd(f.usd_per_second * 3600)}/hour); timeout {_duration(self.timeout)}"]
        out += [f"  {r.name} does not fit: {'; '.join(why)}" for r, why in self.rejected]
        return out


def estimate(flavor: Flavor, needs: Needs) -> tuple[float, float]:
    """(seconds, dollars) of the whole job on this flavor."""
    seconds = run_seconds(needs, cores=flavor.cores, gpu=flavor.gpus > 0)
    return seconds, seconds * flavor.usd_per_second


def choose_flavor(flavors: Sequence[Flavor], needs: Needs, *, wanted: str | None = None,
                  seconds: Callable[[Flavor], float] | None = None, what: str = "this merge",
                  hint: str = "merge fewer or smaller models") -> FlavorChoice:
    """The flavor with the lowest estimated cost among those that fit (or `wanted`, if it fits); `seconds` is
    the run's time on a flavor (default: a merge's); `what` and `hint` word the refusals."""
    if wanted is not None:
        pick = next((f for f in flavors if f.name == wanted), None)
        if pick is None:
            raise MergerError(f"unknown Jobs flavor '{wanted}'; choose one of {', '.join(f.name for f in flavors)}")
        why = pick.shortfalls(needs)
        if why:
            raise MergerError(f"flavor {wanted} cannot run {what} ({'; '.join(why)}); leave out --flavor to "
                              "get the cheapest one that fits")
        candidates = [pick]
    else:
        candidates = [f for f in flavors if not f.shortfalls(needs)]
    if not candidates:
        biggest = max(flavors, key=lambda f: (f.ram_bytes, f.gpu_bytes), default=None)
        detail = f" (largest: {biggest.name}: {'; '.join(biggest.shortfalls(needs))})" if biggest else ""
        raise MergerError(f"no Hugging Face Jobs flavor can hold {what}{detail}; {hint}")

    def cost(f: Flavor) -> tuple[float, float]:
        if seconds is None:
            return estimate(f, needs)
        s = seconds(f)
        return s, s * f.usd_per_second

    costed = sorted(((*cost(f), f) for f in candidates), key=lambda t: (t[1], t[0], t[2].name))
    seconds, usd, pick = costed[0]
    rejected = tuple((f, tuple(f.shortfalls(needs))) for f in sorted(flavors, key=lambda f: f.usd_per_second)
                     if f.usd_per_second <= pick.usd_per_second and f.shortfalls(needs))
    return FlavorChoice(pick, seconds, usd, timeout_seconds(seconds), rejected)


def usd(amount: float) -> str:
    return "< $0.01" if amount < 0.005 else f"${amount:.2f}"


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


def _duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"
