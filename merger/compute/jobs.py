"""`jobs`: the merge as a Hugging Face Job on the user's own account; nothing large passes through here.

The job runs this project's image (on a Space, the Space's own image), mounts every parent as a
read-only model Volume pinned to the commit the check resolved, receives the user's token as a secret
(never in its environment, arguments or log), runs `python -m merger run ... --push` and pushes the result
itself. Its `--progress-lines` output is read back from the job's log as the pipeline's Events; a cancel
calls cancel_job, which stops the job (SIGTERM): the pipeline then removes what it wrote, and a
repository it created is deleted again.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import CancelledError, HubError, MergerError, ModelError
from ..pipeline import Event, EventCallback, RunOptions
from ..recipe import ModelRef, Recipe
from .base import Handle, Outcome
from .flavors import Flavor, FlavorChoice, choose_flavor, usd
from .protocol import parse_line
from .resources import Needs, needs_from_report

MOUNT_ROOT = "/parents"
JOB_OUTPUT = "merge-output"  # relative to the image's working directory
RECIPE_ENV = "MERGER_RECIPE"
TOKEN_SECRET = "HF_TOKEN"
LOG_TAIL = 8  # log lines shown when a job fails
TERMINAL = ("COMPLETED", "CANCELED", "ERROR", "DELETED")
JOB_LABEL = {"created-by": "llm-merger"}
SPACE_IMAGE_PREFIXES = ("https://huggingface.co/spaces/", "https://hf.co/spaces/", "huggingface.co/spaces/",
                        "hf.co/spaces/")


def default_image(environ: Mapping[str, str] | None = None) -> str | None:
    """MERGER_JOB_IMAGE, else on a Space the Space's own image (hf.co/spaces/OWNER/NAME)."""
    env = os.environ if environ is None else environ
    if env.get("MERGER_JOB_IMAGE"):
        return env["MERGER_JOB_IMAGE"]
    return f"hf.co/spaces/{env['SPACE_ID']}" if env.get("SPACE_ID") else None


@dataclass(frozen=True)
class JobPlan:
    """Everything decided before a job is created: hardware, estimates, pinned parents."""

    needs: Needs
    choice: FlavorChoice
    parents: dict[ModelRef, str]  # recipe ref -> commit sha

    def lines(self) -> list[str]:
        return self.choice.lines()


def list_flavors(token: str | None) -> list[Flavor]:
    from huggingface_hub import HfApi

    from ..hub import hub_endpoint

    try:
        infos = HfApi(endpoint=hub_endpoint(), token=token or False).list_jobs_hardware()
    except Exception as e:  # one line, no token
        raise jobs_error(e, token, "list the Jobs hardware") from None
    return [Flavor.from_info(h) for h in infos]


def plan_job(recipe: Recipe, options: RunOptions, *, flavor: str | None = None, report: Any = None) -> JobPlan:
    """Pin the parents, check the recipe at those commits (headers only) and choose the hardware; `report`
    is a check the caller already made (to show the plan beside it)."""
    from ..hub import resolve
    from ..pipeline import check

    local = [ref for ref in recipe.referenced_models() if ref.local or (ref.lora is not None and ref.lora.local)]
    if local:
        raise ModelError(f"a Hugging Face Job can only merge Hub models, and {local[0]} is a local folder; "
                         "upload it to the Hub first, or run the merge here")
    parents = {ref: resolve(ref, token=options.token).sha for ref in recipe.referenced_models()}
    if report is None:  # checked at the very commits the job will mount
        pinned = recipe.with_models({ref: ModelRef(ref.repo, sha, lora=ref.lora) for ref, sha in parents.items()})
        report = check(pinned, token=options.token, gguf=options.gguf, allow_bin=options.allow_bin,
                       max_memory=options.max_memory, strict=options.strict)
    errors = [p for p in report.problems if p.severity == "error"]
    if errors:
        fix = f"; {errors[0].fix}" if errors[0].fix else ""
        raise ModelError(f"pre-flight check failed: {errors[0].message}{fix}")
    needs = needs_from_report(report, evaluate=options.evaluate)
    choice = choose_flavor(list_flavors(options.token), needs, wanted=flavor)
    return JobPlan(needs, choice, parents)


def job_spec(recipe: Recipe, options: RunOptions, plan: JobPlan, image: str) -> dict[str, Any]:
    """run_job's arguments (without the token): command, environment, volumes, flavor, timeout."""
    from huggingface_hub import Volume

    if not options.push:
        raise ModelError("a Hugging Face Job keeps nothing itself: give the repository to push to (--push OWNER/NAME)")
    command = ["python", "-m", "merger", "run", f"env:{RECIPE_ENV}", JOB_OUTPUT, "--push", options.push,
               "--no-check", "--progress-lines", "--device", options.device, "--seed", str(options.seed),
               "--shard-size", str(options.shard_size)]
    if options.gguf:
        command += ["--gguf", ",".join(options.gguf)]
    command += ["--private"] * options.private + ["--gguf-repo"] * options.gguf_repo
    command += ["--overwrite-repo"] * options.overwrite_repo + ["--allow-bin"] * options.allow_bin
    if options.max_memory:
        command += ["--max-memory", str(options.max_memory)]
    command += ["--eval-tokens", str(options.eval_tokens)] + ["--no-eval"] * (not options.evaluate)
    command += ["--gguf-drop-failing"] * options.drop_failing_gguf
    if options.remixed_from:
        command += ["--remixed-from", options.remixed_from]
    volumes = []
    for i, (ref, sha) in enumerate(plan.parents.items()):
        mount = f"{MOUNT_ROOT}/{i}"
        volumes.append(Volume(type="model", source=ref.repo, mount_path=mount, revision=sha, read_only=True))
        command += ["--mounted", f"{ref}={sha}:{mount}"]
    env = {RECIPE_ENV: recipe.text, "PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    space = next((image[len(p):] for p in SPACE_IMAGE_PREFIXES if image.startswith(p)), None)
    if space:  # the card's "reproduce" section installs the tool from the Space that ran the job
        env["MERGER_INSTALL_SOURCE"] = f"git+https://huggingface.co/spaces/{space}"
    return {"command": command, "env": env, "volumes": volumes, "flavor": plan.choice.flavor.name,
            "timeout": plan.choice.timeout, "labels": dict(JOB_LABEL)}


class HubJob(Handle):
    """A Hugging Face Job created with the user's token as its only secret and followed through its log: its
    progress lines become Events, its result line is the result; `cancel()` stops it (SIGTERM) from any thread."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        self.job_id: str | None = None
        self.namespace: str | None = None
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)

    def create_and_follow(self, image: str, spec: Mapping[str, Any], progress: EventCallback, *,
                          nothing: str) -> dict[str, Any]:
        """Create the job (run_job's arguments without the token) and follow it to its end: the job's result,
        or CancelledError / ModelError (with the log's last lines); `nothing` says what a cancel left undone."""
        from huggingface_hub import HfApi

        from ..hub import hub_endpoint

        api = HfApi(endpoint=hub_endpoint(), token=self.token)
        with self._lock:
            if self._cancelled.is_set():
                raise CancelledError("the job was cancelled before it was created; nothing was written")
            try:
                info = api.run_job(image=image, secrets={TOKEN_SECRET: self.token}, **spec)
            except Exception as e:
                raise jobs_error(e, self.token, "create a Hugging Face Job") from None
            self.job_id, self.namespace, self.url = info.id, info.owner.name, info.url
        progress(Event("job", 0.0, f"Hugging Face Job {info.id} on {spec['flavor']}: {info.url}"))
        result = self._follow(api, progress)
        stage, message = self._final_stage(api)
        if stage == "COMPLETED" and result is not None:
            return result
        if stage == "CANCELED" or self._cancelled.is_set():
            raise CancelledError(f"the Hugging Face Job was cancelled; {nothing} ({self.url})")
        tail = " | ".join(self.tail) or "no log output"
        why = f" ({message})" if message else ""
        raise ModelError(f"the Hugging Face Job failed{why}; last log lines: {tail}; full log: {self.url}")

    def cancel(self) -> None:
        with self._lock:
            self._cancelled.set()
            job_id, namespace = self.job_id, self.namespace
        if job_id is None:
            return
        from huggingface_hub import HfApi

        from ..hub import hub_endpoint

        try:
            HfApi(endpoint=hub_endpoint(), token=self.token).cancel_job(job_id=job_id, namespace=namespace)
        except Exception as e:
            raise jobs_error(e, self.token, "cancel the Hugging Face Job") from None

    def _follow(self, api: Any, progress: EventCallback) -> dict[str, Any] | None:
        """Read the job's log to its end: progress lines become Events, the rest is kept as the tail."""
        result = None
        try:
            for line in api.fetch_job_logs(job_id=self.job_id, namespace=self.namespace, follow=True):
                parsed = parse_line(line)
                if isinstance(parsed, Event):
                    progress(parsed)
                elif isinstance(parsed, dict):
                    result = parsed
                elif line.strip():  # of a progress bar redrawn with carriage returns, its last state
                    self.tail.append(_scrub(line.split("\r")[-1].strip() or line.strip(), self.token))
        except Exception as e:
            raise jobs_error(e, self.token, "follow the Hugging Face Job's log") from None
        return result

    def _final_stage(self, api: Any, wait: float = 30.0) -> tuple[str, str | None]:
        """The job's terminal stage (the Hub marks it a moment after the log ends)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                info = api.inspect_job(job_id=self.job_id, namespace=self.namespace)
            except Exception as e:
                raise jobs_error(e, self.token, "read the Hugging Face Job's status") from None
            stage = str(getattr(info.status.stage, "value", info.status.stage))
            if stage in TERMINAL or time.monotonic() > deadline:
                return stage, info.status.message
            time.sleep(1.0)


class JobHandle(HubJob):
    """One merge as a Hugging Face Job: check and plan, create, follow the log, report the outcome."""

    def __init__(self, recipe: Recipe, options: RunOptions, *, image: str | None, flavor: str | None,
                 on_plan: Any = None) -> None:
        super().__init__(options.token)
        self.recipe, self.options, self.image, self.flavor = recipe, options, image, flavor
        self.on_plan = on_plan  # called with the JobPlan before the job is created (the CLI prints it)

    def run(self, progress: EventCallback) -> Outcome:
        from ..hub import check_write_access, validate_repo_id

        token = self.options.token
        if not token:
            raise HubError("a Hugging Face Job runs on your account: sign in (or pass --token / set HF_TOKEN)")
        if not self.options.push:
            raise ModelError("a Hugging Face Job keeps nothing itself: give the repository to push to "
                             "(--push OWNER/NAME)")
        if not self.image:
            raise ModelError("no image to run the job in: give --job-image (a Space running this project, "
                             "hf.co/spaces/OWNER/NAME, or a Docker image with it installed)")
        validate_repo_id(self.options.push)
        check_write_access(self.options.push, token=token)
        progress(Event("check", 0.0, "checking the recipe and the models (no weights are downloaded)"))
        plan = plan_job(self.recipe, self.options, flavor=self.flavor)
        if self.on_plan is not None:
            self.on_plan(plan)
        c = plan.choice
        progress(Event("check", 1.0, f"check passed; Hugging Face Jobs flavor {c.flavor.name}, estimated "
                                     f"{c.seconds / 60:.0f} min and {usd(c.usd)}"))
        spec = job_spec(self.recipe, self.options, plan, self.image)
        return self._outcome(self.create_and_follow(self.image, spec, progress, nothing="nothing was pushed"))

    def _outcome(self, result: Mapping[str, Any]) -> Outcome:
        card = ""
        if self.options.push:
            from ..hub import read_text, resolve

            try:
                card = read_text(resolve(self.options.push, token=self.options.token), "README.md",
                                 token=self.options.token)
            except MergerError:
                card = ""
        files = tuple((str(name), int(size)) for name, size in result.get("files", []))
        verdict = result.get("verdict")
        return Outcome(files, card, tuple(result.get("pushed", [])), dict(result.get("sanity", {})),
                       tuple(result.get("warnings", [])), None, float(result.get("seconds", 0.0)),
                       tuple(str(line) for line in result.get("quality", [])),
                       str(verdict) if verdict else None, url=self.url)


class Jobs:
    """Hugging Face Jobs on the user's account (their token), in this project's image."""

    name = "jobs"

    def __init__(self, *, image: str | None = None, flavor: str | None = None, on_plan: Any = None) -> None:
        self.image = image or default_image()
        self.flavor = flavor
        self.on_plan = on_plan

    def submit(self, recipe: Recipe, options: RunOptions) -> JobHandle:
        return JobHandle(recipe, options, image=self.image, flavor=self.flavor, on_plan=self.on_plan)


def jobs_error(e: BaseException, token: str | None, verb: str) -> MergerError:
    """A Jobs API failure as one line; a token without the `jobs` permission gets its own explanation."""
    import httpx2

    from ..hub import _hub_error, _root_cause, _status, hub_endpoint

    if isinstance(e, MergerError):
        return e
    cause = _root_cause(e)
    status = _status(cause)
    if status == 403:
        return HubError(f"your Hugging Face token may not run Jobs (HTTP 403 when trying to {verb}): sign in again "
                        "and allow 'jobs' (on the Space), or create a token with the Jobs permission at "
                        f"{hub_endpoint()}/settings/tokens (Jobs need a PRO account or a paid organisation); "
                        "or run the merge here")
    if status == 401 or isinstance(cause, (httpx2.TransportError, ConnectionError, TimeoutError)):
        return _hub_error(e, None, token=token, verb=verb)
    detail = f"HTTP {status}" if status else type(cause).__name__
    return HubError(_scrub(f"could not {verb} ({detail}); retry in a few minutes", token))


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text
