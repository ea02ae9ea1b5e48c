"""`merger eval --job`: lm-evaluation-harness on a published merge (and its parents) as a Hugging Face Job
on the user's account; the job itself commits the card's benchmark table and `.eval_results/` in one commit.

The job runs `python -m merger eval OWNER/NAME ... --progress-lines` in this project's image with the
user's token as a secret (never in its environment, arguments or log); its progress lines become the same
Events as a local evaluation, and a cancel stops it before its commit (the repository stays unchanged).
The hardware is the cheapest flavor whose RAM, disk and GPU memory hold the largest model, by the
planning figures below (orders of magnitude, not measurements on Hugging Face hardware).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import HubError, ModelError
from ..pipeline import Event, EventCallback
from .flavors import Flavor, FlavorChoice, choose_flavor, usd
from .jobs import JOB_LABEL, HubJob, default_image, list_flavors
from .resources import BASE_RAM, DISK_MARGIN, GB, READ_BPS, START_SECONDS, Needs

MODEL_RAM_FACTOR = 1.2  # the loaded weights plus transformers' and lm-eval's working memory
GPU_WORKSPACE = 2 * GB  # activations and logits of lm-eval's batches on top of the weights
DATASETS_DISK = 2 * GB  # the benchmarks' datasets in the job's cache
BYTES_PER_PARAM = 2  # Hub checkpoints are mostly bf16/fp16: parameters from the weight files' size
GPU_FLOPS = 20e12  # sustained forward FLOP/s of one Jobs GPU under lm-eval (planning figure)
CPU_FLOPS_PER_CORE = 10e9
# Tokens run through the model for a whole task in lm-eval's default (zero-shot or the task's own few-shot)
# setup: examples x choices x prompt tokens, rounded up; and the number of examples, for --limit.
TASK_TOKENS: dict[str, tuple[float, int]] = {
    "arc_challenge": (3e5, 1172), "hellaswag": (4e6, 10042), "mmlu": (7e6, 14042),
    "truthfulqa_mc2": (2e6, 817), "winogrande": (1e5, 1267), "gsm8k": (2e6, 1319),
}
UNKNOWN_TASK = (1e6, 1000)


@dataclass(frozen=True)
class EvalRequest:
    """What `merger eval` is asked: the merge, the tasks, and how."""

    repo_id: str
    tasks: tuple[str, ...]
    parents: bool = False
    limit: int | None = None
    include_path: str | None = None  # a task folder inside the job's image
    token: str | None = None


@dataclass(frozen=True)
class EvalPlan:
    """Decided before the job is created: the models to score, their sizes, the hardware."""

    models: tuple[str, ...]  # the merge first, then its parents
    weight_bytes: tuple[int, ...]
    needs: Needs
    choice: FlavorChoice

    def lines(self) -> list[str]:
        return self.choice.lines()


def task_tokens(tasks: Sequence[str], limit: int | None) -> float:
    """Planning figure: tokens one model runs through for `tasks` (at most `limit` examples each)."""
    total = 0.0
    for task in tasks:
        tokens, examples = TASK_TOKENS.get(task, UNKNOWN_TASK)
        total += tokens * (min(limit, examples) / examples if limit else 1.0)
    return total


def eval_needs(weight_bytes: Sequence[int]) -> Needs:
    """Memory for the largest model, disk for all of them and the datasets."""
    largest = max(weight_bytes)
    return Needs(ram_bytes=BASE_RAM + int(largest * MODEL_RAM_FACTOR),
                 disk_bytes=int(sum(weight_bytes) * DISK_MARGIN) + DATASETS_DISK,
                 gpu_bytes=int(largest * MODEL_RAM_FACTOR) + GPU_WORKSPACE, read_bytes=sum(weight_bytes),
                 output_bytes=0, gguf_bytes=0, parents_on_disk=sum(weight_bytes))


def eval_seconds(flavor: Flavor, weight_bytes: Sequence[int], tokens_per_model: float) -> float:
    """Start, downloads, and 2 x parameters x tokens of forward passes per model, on this flavor."""
    flops = GPU_FLOPS if flavor.gpus else CPU_FLOPS_PER_CORE * max(flavor.cores, 1)
    compute = sum(2 * (b / BYTES_PER_PARAM) * tokens_per_model for b in weight_bytes) / flops
    return START_SECONDS + sum(weight_bytes) / READ_BPS + compute


def plan_eval(request: EvalRequest, *, flavor: str | None = None) -> EvalPlan:
    """The models (the merge and, with parents, those its card names), their weight sizes, the flavor."""
    from ..eval.harness import merge_and_parents
    from ..hub import resolve

    _, parents = merge_and_parents(request.repo_id, parents=request.parents, token=request.token)
    models = (request.repo_id, *parents)
    sizes = []
    for name in models:
        files = resolve(name, token=request.token).files
        weights = ([size for path, size in files.items() if path.endswith(".safetensors")]
                   or [size for path, size in files.items() if path.endswith(".bin")])
        if not weights:
            raise ModelError(f"{name} has no weight files (.safetensors) to evaluate; check the repository")
        sizes.append(sum(weights))
    needs = eval_needs(sizes)
    tokens = task_tokens(request.tasks, request.limit)
    choice = choose_flavor(list_flavors(request.token), needs, wanted=flavor,
                           seconds=lambda f: eval_seconds(f, sizes, tokens), what="this evaluation",
                           hint="evaluate without --parents, or a smaller model")
    return EvalPlan(models, tuple(sizes), needs, choice)


def eval_command(request: EvalRequest, plan: EvalPlan) -> list[str]:
    """The job's command: the same `merger eval`, on the flavor's GPU when it has one."""
    command = ["python", "-m", "merger", "eval", request.repo_id, "--tasks", ",".join(request.tasks),
               "--device", "cuda" if plan.choice.flavor.gpus else "cpu", "--progress-lines"]
    command += ["--parents"] * request.parents
    if request.limit:
        command += ["--limit", str(request.limit)]
    if request.include_path:
        command += ["--include-path", request.include_path]
    return command


class EvalJobHandle(HubJob):
    """One evaluation as a Hugging Face Job: plan, create, follow the log, report the scores."""

    def __init__(self, request: EvalRequest, *, image: str | None, flavor: str | None,
                 on_plan: Callable[[EvalPlan], None] | None = None) -> None:
        super().__init__(request.token)
        self.request, self.image, self.flavor, self.on_plan = request, image, flavor, on_plan

    def run(self, progress: EventCallback) -> dict[str, Any]:
        """Follow the job to its end; the job's result: {"scores": {...}, "parents": {...}, "committed": bool}."""
        from ..hub import check_write_access, validate_repo_id

        r = self.request
        validate_repo_id(r.repo_id)
        if not r.token:
            raise HubError("a Hugging Face Job runs on your account: sign in (or pass --token / set HF_TOKEN)")
        if not self.image:
            raise ModelError("no image to run the job in: give --job-image (a Space running this project, "
                             "hf.co/spaces/OWNER/NAME, or a Docker image with it installed)")
        check_write_access(r.repo_id, token=r.token)  # the job commits to it: refuse before paying for it
        progress(Event("check", 0.0, f"reading {r.repo_id}'s card and the sizes of the models to evaluate"))
        plan = plan_eval(r, flavor=self.flavor)
        if self.on_plan is not None:
            self.on_plan(plan)
        c = plan.choice
        progress(Event("check", 1.0, f"{len(plan.models)} model(s); Hugging Face Jobs flavor {c.flavor.name}, "
                                     f"estimated {c.seconds / 60:.0f} min and {usd(c.usd)}"))
        env = {"PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        spec = {"command": eval_command(r, plan), "env": env, "flavor": c.flavor.name, "timeout": c.timeout,
                "labels": dict(JOB_LABEL, task="eval")}
        return self.create_and_follow(self.image, spec, progress, nothing="the repository is unchanged")


class EvalJobs:
    """Evaluations as Hugging Face Jobs on the user's account, in this project's image."""

    def __init__(self, *, image: str | None = None, flavor: str | None = None,
                 on_plan: Callable[[EvalPlan], None] | None = None) -> None:
        self.image = image or default_image()
        self.flavor, self.on_plan = flavor, on_plan

    def submit(self, request: EvalRequest) -> EvalJobHandle:
        return EvalJobHandle(request, image=self.image, flavor=self.flavor, on_plan=self.on_plan)
