"""The app's logic without the UI: settings, demo models, starting recipes, names, and report rendering.

app.py only builds the Gradio page and wires events to these functions, so everything the page shows
can be tested without a browser. Two modes: on a Space (SPACE_ID set) only Hub repos are accepted and
each job runs in a temporary folder; locally the app works offline with tiny generated demo models
and writes to ./outputs/<job>/.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import yaml

from ..check import GGUF_BITS, CheckReport
from ..errors import HubError, MergerError, RecipeError
from ..methods import METHODS, REQUIRED, get_method
from ..pipeline import RunOptions
from ..recipe import Recipe, parse_model_ref, parse_recipe
from .results import (card_markdown, cell as _cell, human_bytes, human_seconds, render_log,  # noqa: F401
                      render_outcome, render_progress)
from .runs import Run, Snapshot

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_HOST, SPACE_HOST, PORT = "127.0.0.1", "0.0.0.0", 7860
DEMO_MODELS = ("base", "chat", "code")  # a tiny Llama base and two "fine-tunes" of it
DEFAULT_QUANTS = ("Q4_K_M",)

# What each offered GGUF type is for; sizes are relative to the F16 file, from llama.cpp's bits per weight.
GGUF_CHOICES: dict[str, str] = {
    "Q4_K_M": "the usual choice: good quality for its size",
    "Q5_K_M": "a little larger, closer to the original",
    "Q6_K": "near-original quality",
    "Q8_0": "practically lossless",
    "Q3_K_M": "small, noticeably lower quality",
    "Q2_K": "smallest, large quality loss",
    "F16": "unquantized, for further conversion",
}

# Values written into a starting recipe for parameters that have no default.
_SUGGESTED = {"t": 0.5, "density": 0.5}
_NEARSWAP_T = 0.001
_MODEL_LINE = re.compile(r"^(\s*(?:-\s+)?(?:model|base_model|source_model)\s*:\s*)"
                         r"([\"']?)([^\s\"'#]+)\2(\s*(?:#.*)?)$", re.MULTILINE)
_EXPERTS_LINE = re.compile(r"^experts\s*:", re.MULTILINE)  # a mergekit-moe config
_METHOD_LINE = re.compile(r"^merge_method\s*:\s*([\"']?)([A-Za-z_]+)\1\s*(?:#.*)?$", re.MULTILINE)


@dataclass(frozen=True)
class Settings:
    """Where and how the app runs, decided once from the environment."""

    space: bool
    host: str
    port: int
    outputs_dir: Path
    demo_dir: Path

    @property
    def allow_local(self) -> bool:
        return not self.space


def settings_from_env(environ: Mapping[str, str] | None = None, root: Path = REPO_ROOT) -> Settings:
    """Space mode when SPACE_ID is set (bind 0.0.0.0, Hub repos only), else local mode on 127.0.0.1."""
    env = os.environ if environ is None else environ
    space = bool(env.get("SPACE_ID"))
    return Settings(space=space, host=SPACE_HOST if space else LOCAL_HOST,
                    port=int(env.get("PORT") or env.get("GRADIO_SERVER_PORT") or PORT),
                    outputs_dir=root / "outputs", demo_dir=root / "demo_models")


def quiet_environment(environ: dict[str, str] | None = None) -> None:
    """No analytics or telemetry requests from gradio or huggingface_hub (set before importing them)."""
    env = os.environ if environ is None else environ
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"


def space_environment(environ: dict[str, str] | None = None) -> None:
    """With SPACE_ID set (a Space), make gradio agree: it serves the real sign-in only with SYSTEM=spaces,
    which Docker Spaces do not set (the Dockerfile does; this covers any other image). Before importing gradio."""
    env = os.environ if environ is None else environ
    if env.get("SPACE_ID") and not env.get("SYSTEM"):
        env["SYSTEM"] = "spaces"


def ensure_demo_models(folder: Path) -> dict[str, Path]:
    """The demo models, generated on first use (deterministic, so a rerun rewrites identical bytes)."""
    from .tiny import make_tiny_model

    paths = {name: folder / name for name in DEMO_MODELS}
    if not all((p / "config.json").is_file() and (p / "model.safetensors").is_file() for p in paths.values()):
        make_tiny_model(paths["base"], "llama", seed=1)
        for i, name in enumerate(DEMO_MODELS[1:]):
            make_tiny_model(paths[name], perturb_from=paths["base"], seed=10 + i, perturb_scale=0.05)
    return paths


# ---------------------------------------------------------------- models box <-> recipe

def parse_model_list(text: str, *, allow_local: bool) -> list[str]:
    """The models box: one Hub repo ID (optionally @revision) per line; blank lines and # comments skipped."""
    models = []
    for i, line in enumerate((text or "").splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        parse_model_ref(item, f"models box, line {i}", allow_local=allow_local)
        if item not in models:
            models.append(item)
    return models


def recipe_models(text: str) -> list[str]:
    """Models named in a recipe text, in order of first appearance (works on YAML that does not parse)."""
    out: list[str] = []
    for m in _MODEL_LINE.finditer(text or ""):
        if m.group(3) not in out:
            out.append(m.group(3))
    return out


def recipe_method(text: str) -> str | None:
    """The merge_method of a recipe text, when it names a known method."""
    m = _METHOD_LINE.search(text or "")
    return m.group(2) if m and m.group(2) in METHODS else None


def substitute_models(text: str, models: Sequence[str]) -> str:
    """The recipe with its k-th distinct model replaced by models[k] (formatting and parameters kept)."""
    mapping = dict(zip(recipe_models(text), models))
    return _MODEL_LINE.sub(lambda m: f"{m.group(1)}{m.group(2)}{mapping.get(m.group(3), m.group(3))}"
                                     f"{m.group(2)}{m.group(4)}", text)


def layer_count(model: str, token: str | None) -> int:
    """num_hidden_layers of a local folder or a Hub model (its config.json only)."""
    ref = parse_model_ref(model, "model", allow_local=True)
    if ref.local:
        config = json.loads((Path(ref.repo) / "config.json").read_text(encoding="utf-8"))
    else:  # through merger.hub, which asks the Hub for this user's access before any cached file is used
        from ..hub import read_text, resolve

        try:
            config = json.loads(read_text(resolve(ref, token=token), "config.json", token=token))
        except json.JSONDecodeError:
            raise RecipeError(f"{ref}'s config.json is not valid JSON; write the slices' layer_range by hand") from None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    raise RecipeError(f"{model}'s config.json has no layer count; write the slices' layer_range by hand")


def starting_recipe(models: Sequence[str], method: str, *, token: str | None = None) -> str:
    """A valid first recipe for these models and method: the first model is the base where one is used."""
    spec = get_method(method)
    n = len(models)
    if n == 0:
        raise RecipeError("add at least one model (a Hub repo ID per line) first")
    if method == "passthrough":
        return _frankenmerge(models, token)
    lo, hi = spec.min_models, spec.max_models
    if n < lo or (hi is not None and n > hi):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
        raise RecipeError(f"{method} merges {want} models and the box has {n}; add or remove models")
    base = models[0] if spec.base == "required" else None
    required = [p for p in spec.params if p.per_model and p.default is REQUIRED]
    has_density = any(p.name == "density" for p in spec.params)
    shared = {p.name: (_NEARSWAP_T if method == "nearswap" else _SUGGESTED.get(p.name, 0.5))
              for p in spec.params if not p.per_model and p.default is REQUIRED}
    entries = []
    for m in models:
        takes = [p for p in required if m != base or not p.non_base]
        weighted = [x for x in models if x != base or not all(p.non_base for p in required)]
        params: dict[str, float] = {p.name: round(1 / len(weighted), 3) if p.name == "weight" else 1.0
                                    for p in takes}
        if has_density and m != base:
            params["density"] = _SUGGESTED["density"]
        entries.append({"model": m, **({"parameters": params} if params else {})})
    data: dict[str, Any] = {"models": entries, "merge_method": method}
    if base is not None:
        data["base_model"] = base
    if shared:
        data["parameters"] = shared
    data["dtype"] = "float16"
    return _dump(data)


def _frankenmerge(models: Sequence[str], token: str | None) -> str:
    """Passthrough: the first half of the first model's layers, then each next model's second half."""
    slices = []
    for i, m in enumerate(models):
        layers = layer_count(m, token)
        start, end = (0, layers // 2 + layers % 2) if i == 0 else (layers // 4, layers)
        slices.append({"sources": [{"model": m, "layer_range": [start, end]}]})
    return _dump({"slices": slices, "merge_method": "passthrough", "dtype": "float16"})


class _RecipeDumper(yaml.SafeDumper):
    """Block style for structure, flow style for short number lists (layer ranges, gradients)."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)  # indent list items under their key, as the examples do


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(v, (int, float)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _represent_list)


def _dump(data: Mapping[str, Any]) -> str:
    return yaml.dump(dict(data), Dumper=_RecipeDumper, sort_keys=False, indent=2, width=100)


def sync_models_into_recipe(text: str, models: Sequence[str], method: str, *, token: str | None = None) -> str:
    """After the models box changed: substitute in place when the counts match, else start afresh."""
    if models and len(recipe_models(text)) == len(models):
        return substitute_models(text, models)
    return starting_recipe(models, recipe_method(text) or method, token=token)


def models_for_method(models: Sequence[str], method: str) -> list[str]:
    """The first models up to the method's maximum (SLERP takes two of the three demo models)."""
    limit = get_method(method).max_models
    return list(models[:limit] if limit and method != "passthrough" else models)


def gallery_recipe(text: str, models: Sequence[str]) -> str:
    """A gallery recipe with the user's models put in, when the box has enough of them."""
    return substitute_models(text, models) if len(models) >= len(recipe_models(text)) else text


# ---------------------------------------------------------------- names and options

def _short_name(model: str) -> str:
    name = model.split("@")[0].rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def default_repo_name(text: str, username: str | None = None) -> str:
    """`user/<parent>-<parent>-<method>`: a Hub-valid name that says what went in and how."""
    method = recipe_method(text) or ("moe" if _EXPERTS_LINE.search(text or "") else "merge")
    parts = list(dict.fromkeys(_short_name(m) for m in recipe_models(text)))[:3]
    name = re.sub(r"-{2,}", "-", "-".join([*parts, method.replace("_", "-")]))
    name = re.sub(r"\.{2,}", ".", name)[:96].rstrip("-.")
    return f"{username}/{name}" if username else name


def gguf_choices() -> list[tuple[str, str]]:
    """(label, value) pairs for the GGUF picker: each type with its size relative to F16 and its use."""
    return [(f"{t}: ~{GGUF_BITS[t] / 16:.0%} of F16 size, {use}", t) for t, use in GGUF_CHOICES.items()]


def publish_target(name: str, token: str | None) -> str:
    """`namespace/name`: a bare name is put under the token's account (asked of the Hub)."""
    name = name.strip()
    if "/" in name:
        return name
    if not token:
        raise HubError("publishing needs you to sign in with Hugging Face (locally: set HF_TOKEN)")
    from huggingface_hub import HfApi

    from ..hub import hub_endpoint

    try:
        user = HfApi(endpoint=hub_endpoint()).whoami(token=token)["name"]
    except Exception as e:  # the token is never part of the message
        raise HubError(f"could not ask the Hub who you are ({type(e).__name__}); sign in again") from None
    return f"{user}/{name}"


# ---------------------------------------------------------------- rendering

def render_check(report: CheckReport) -> str:
    """The pre-flight report as Markdown: verdict, models table (a model that could not be read is listed as
    such), problems with their fixes, and estimates only when every model could be read (else they would
    count some models as 0 B)."""
    d = report.as_dict()
    verdict = "✓ **OK**: the merge can run" if d["ok"] else "✗ **Not mergeable**: fix the errors below"
    named = [str(ref) for ref in report.recipe.referenced_models()]
    read = {m["ref"]: m for m in d["models"]}
    missing = [ref for ref in named if ref not in read]
    count = f"{len(named)} model(s)" + (f", {len(missing)} of them could not be read" if missing else "")
    lines = [f"### Check: {verdict}", "", f"Method `{d['method']}`, {count}.", ""]
    if named:
        lines += ['<div class="report-table">', "",
                  "| model | architecture | layers | hidden | vocab | dtype | parameters | access |",
                  "|---|---|---|---|---|---|---|---|"]
        for ref in named:
            m = read.get(ref)
            cells = ([_cell(m.get(k, "")) for k in ("ref", "architecture", "layers", "hidden_size", "vocab_size",
                                                    "dtype", "parameters", "access")] if m
                     else [_cell(ref), "**not found**", "", "", "", "", "", "see the error below"])
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "</div>", ""]
    if d["problems"]:
        order = ("error", "warning", "note")
        for p in sorted(d["problems"], key=lambda p: order.index(p["severity"])):
            mark = {"error": "✗", "warning": "⚠", "note": "ℹ"}[p["severity"]]
            fix = p["fix"] or (_MISSING_FIX if any(p["message"].startswith(f"{r}:") for r in missing) else "")
            lines.append(f"- {mark} **{p['severity']}**: {_cell(p['message'])}" + (f"  \n  *Fix:* {_cell(fix)}"
                                                                                 if fix else ""))
    else:
        lines.append("No problems found.")
    if d["estimates"] and not missing:
        e = d["estimates"]
        download = (human_bytes(e["download_bytes"]) if e["download_bytes"] else
                    "nothing (local folders)" if all(ref.local for ref in report.recipe.referenced_models())
                    else "nothing (already cached)")
        lines += ["", f"Download {download} · output {human_bytes(e['output_bytes'])}"
                      + (f" · GGUF {human_bytes(e['gguf_bytes'])}" if e["gguf_bytes"] else "")
                      + f" · disk peak {human_bytes(e['disk_bytes'])}"
                      f" · RAM {human_bytes(max(e['merge_ram_bytes'], e['gguf_ram_bytes']))}"]
    elif missing:
        lines += ["", "Sizes and memory are estimated once every model can be read."]
    return "\n".join(lines)


_MISSING_FIX = ("check the spelling (org/name, or the folder path), that the model exists, and that your "
                "token may read it")


def render_error(error: BaseException) -> str:
    """A user's mistake as one line (MergerError); anything else says it is a bug, without internals."""
    if isinstance(error, MergerError):
        return f"✗ {error}"
    return f"✗ internal error ({type(error).__name__}); please report it with your recipe"


# ---------------------------------------------------------------- jobs

def resolve_token(settings: Settings, oauth_token: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The user's token: from OAuth; locally (no OAuth) from HF_TOKEN. A Space never uses its own token."""
    if oauth_token:
        return oauth_token
    if settings.space:
        return None
    env = os.environ if environ is None else environ
    return env.get("HF_TOKEN") or None


SIGNED_OUT = ("you are not signed in (a sign-in lasts 8 hours and may have expired while the merge waited in the "
              "queue): sign in with Hugging Face and press Merge again; nothing was started")
EXPIRED = ("your Hugging Face sign-in expired while the merge waited in the queue: sign out, sign in again and "
           "press Merge; nothing was started")
MIN_SESSION_SECONDS = 600  # a sign-in about to expire would fail the push at the end: renew it first


def ensure_signed_in(token: str | None, expires_at: float | None, *, now: float | None = None) -> None:
    """On a Space, right before a job starts: the user's sign-in is still valid (it may have expired, or
    been revoked, while the job waited in the queue). Asks the Hub who the token belongs to."""
    if not token:
        raise HubError(SIGNED_OUT)
    left = None if expires_at is None else expires_at - (time.time() if now is None else now)
    if left is not None and left <= 0:
        raise HubError(EXPIRED)
    if left is not None and left < MIN_SESSION_SECONDS:
        raise HubError(f"your Hugging Face sign-in expires in {max(1, int(left // 60))} minute(s), too soon for a "
                       "merge and its upload: sign out and sign in again to renew it, then press Merge")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from ..hub import hub_endpoint

    try:
        HfApi(endpoint=hub_endpoint()).whoami(token=token)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise HubError(EXPIRED) from None
        raise HubError(f"could not ask the Hub who you are (HTTP {status}); retry in a minute") from None
    except Exception as e:  # network: one line, never the token
        raise HubError(f"could not reach the Hub to check your sign-in ({type(e).__name__}); retry in a minute"
                       ) from None


def check_report(settings: Settings, text: str, quants: Sequence[str], token: str | None, *,
                 here: bool = True) -> CheckReport:
    """The Check button: the pre-flight report, with the disk estimate compared with the free space where a
    job would run (`here`; a Hugging Face Job's disk is its flavor's, chosen from the estimate). On a Space
    the check reads through a cache of its own, removed right after."""
    import tempfile

    from .. import pipeline

    recipe = parse_recipe(text, allow_local=settings.allow_local)
    if not here:
        return pipeline.check(recipe, token=token, gguf=tuple(quants))
    if not settings.space:
        return pipeline.check(recipe, token=token, gguf=tuple(quants), out_dir=settings.outputs_dir)
    from ..hub import job_cache

    with tempfile.TemporaryDirectory(prefix="check-") as tmp, job_cache(Path(tmp) / "hub-cache"):
        return pipeline.check(recipe, token=token, gguf=tuple(quants), out_dir=Path(tmp) / "out", on_space=True,
                              stream=None)


@dataclass(frozen=True)
class JobRequest:
    """Everything a merge job needs, validated before it takes its place in the queue."""

    recipe: Recipe
    options: RunOptions
    job_dir: Path  # the job's own folder, holding options.out_dir
    keep: bool  # keep the output after success (local mode); a Space removes it after the push
    cache_dir: Path | None = None  # a Space job downloads into a cache of its own inside job_dir


def job_request(settings: Settings, text: str, repo_name: str, *, private: bool, publish: bool,
                quants: Sequence[str], token: str | None, job_id: str,
                expires_at: float | None = None, gguf_repo: bool = False) -> JobRequest:
    """Parse and decide where the job writes: ./outputs/<job>/<name> locally, a temp folder on a Space
    (with the job's own download cache in it). On a Space the sign-in is checked first (`expires_at`:
    when the OAuth token expires, seconds since the epoch). `gguf_repo`: GGUF files go to OWNER/NAME-GGUF
    (not the model repo)."""
    import tempfile

    recipe = parse_recipe(text, allow_local=settings.allow_local)
    unknown = [q for q in quants if q not in GGUF_CHOICES]
    if unknown:
        raise RecipeError(f"unknown GGUF type(s) {', '.join(unknown)}; choose from {', '.join(GGUF_CHOICES)}")
    if settings.space:
        ensure_signed_in(token, expires_at)
    if settings.space and not publish:
        raise HubError("on this Space a merge is kept only by publishing it: tick 'Publish' and sign in")
    if publish and not token:
        raise HubError("publishing needs you to sign in with Hugging Face"
                       + ("" if settings.space else " (locally: set HF_TOKEN before starting the app)"))
    name = (repo_name or "").strip() or default_repo_name(text)
    push = publish_target(name, token) if publish else None
    if push:
        from ..hub import validate_repo_id

        validate_repo_id(push)
    if settings.space:
        job_dir = Path(tempfile.mkdtemp(prefix=f"merge-{job_id}-"))
    else:
        job_dir = settings.outputs_dir / job_id
    options = RunOptions(out_dir=job_dir / _short_name(name), gguf=tuple(quants), push=push, token=token,
                         gguf_repo=gguf_repo and bool(push and quants),
                         private=private, allow_local=settings.allow_local,
                         allow_local_paths=settings.allow_local)  # local app: the user's own folders
    return JobRequest(recipe, options, job_dir, keep=not settings.space,
                      cache_dir=job_dir / "hub-cache" if settings.space else None)


def follow(job: Run, interval: float = 0.25, serve: Callable[[], Iterator[None]] | None = None) -> Iterator[Snapshot]:
    """Snapshots of a job whenever it changed, ending with the finished one.

    `serve` (a ZeroGPU backend's) runs, in this thread, the work the job hands over to it, yielding after
    each step; it is called between polls.
    """
    last = None
    while True:
        for _ in serve() if serve is not None else ():
            snap = job.snapshot()
            if snap != last:
                yield snap
                last = snap
        finished = job.wait(interval)
        snap = job.snapshot()
        if snap != last:
            yield snap
            last = snap
        if finished:
            return


def recipe_status(text: str, *, allow_local: bool) -> str:
    """The line under the editor: what the recipe merges, or the one-line error that stops it."""
    try:
        recipe = parse_recipe(text, allow_local=allow_local)
    except MergerError as e:
        return render_error(e)
    n = len(recipe.referenced_models())
    return f"✓ valid recipe: `{recipe.method}` of {n} model(s); press **Check** to inspect the models"


def chat_source(snap: Snapshot | None, *, allow_local: bool) -> str:
    """What to chat with after a run: the merged GGUF on disk (local mode), else the repo it was pushed to."""
    from .chat import pick_gguf

    o = snap.outcome if snap is not None else None
    if o is None:
        return ""
    name = pick_gguf([f for f, _ in o.files])
    if name is None:
        return ""
    if allow_local and o.out_dir is not None:
        return str(o.out_dir / name)
    gguf_repo = next((url for url in o.pushed if url.endswith("-GGUF")), o.pushed[0] if o.pushed else "")
    return "/".join(gguf_repo.rstrip("/").split("/")[-2:]) if gguf_repo else ""

