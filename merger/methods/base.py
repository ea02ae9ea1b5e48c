"""The contract between a merge method and its callers: parameters, inputs, and the method record.

A method is data (its parameters, its input rules, its paper) plus one kernel: a function of a `Job`
(one output tensor's inputs, reachable block by block) that makes the sweeps its whole-tensor
quantities need and emits the merged float32 values. The recipe parser reads the data to refuse bad
recipes before any download; the engine calls `Method.run` once per output tensor, over files;
`Method.merge` runs the same kernel over tensors in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from merger.errors import RecipeError
from merger.methods.blocks import Job, Layout, slice_span

Scope = Literal["shared", "input", "non_base"]
BasePolicy = Literal["required", "optional", "ignored"]


class _Required:
    """Marker default of a parameter the recipe must set."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Interval:
    """A range of accepted numbers; `None` bounds are open-ended."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def __str__(self) -> str:
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{left}{low}, {high}{right}"


@dataclass(frozen=True)
class Param:
    """One recipe parameter of a method, with mergekit's name, scope and default.

    scope: "shared" = one value for the tensor (top-level/slice `parameters:`); "input" = a value per
    input model, base included; "non_base" = a value per input model except the base.
    """

    name: str
    kind: type  # float, int or bool
    scope: Scope
    default: Any = REQUIRED
    interval: Interval | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def per_model(self) -> bool:
        return self.scope != "shared"

    @property
    def non_base(self) -> bool:
        return self.scope == "non_base"

    def validate(self, value: Any) -> str | None:
        """Return why `value` is not acceptable (an error fragment), or None if it is.

        Numbers are accepted for bool parameters only as 0 or 1 (shared recipes write
        `int8_mask: 1.0`), ints for float parameters, and integral floats for int parameters.
        """
        if value is None:
            return None if self.default is None else f"{self.name} must be set to a {self.kind.__name__}"
        if self.kind is bool:
            if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
                return None
            return f"{self.name} must be true or false, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{self.name} must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"{self.name} must be a finite number, got {value!r}"
        if self.kind is int and not float(value).is_integer():
            return f"{self.name} must be a whole number, got {value!r}"
        if self.interval is not None and value not in self.interval:
            return f"{self.name} must be in {self.interval}, got {value!r}"
        return None

    def coerce(self, value: Any) -> Any:
        """Return `value` as this parameter's type; RecipeError if `validate` refuses it."""
        problem = self.validate(value)
        if problem is not None:
            raise RecipeError(f"{problem}; fix the value in the recipe's parameters")
        if value is None:
            return None
        return self.kind(value)


@dataclass
class MergeInputs:
    """Whole input tensors in memory for one output tensor (the engine streams blocks instead).

    tensors: float32, same shape and device, one per input model in recipe order (base included);
    kernels never modify them. model_params[i]: the per-model values resolved for input i ("non_base"
    values given for the base are ignored); missing ones take defaults. params: shared values.
    generator: the only source of randomness for randomized methods; the engine seeds it from
    (seed, name), and a CPU generator makes the draws independent of the device that merges.
    """

    tensors: Sequence[torch.Tensor]
    base_index: int | None = None
    model_params: Sequence[Mapping[str, Any]] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    generator: torch.Generator | None = None
    workspace: Callable[[str, tuple[int, ...]], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if not self.model_params:
            self.model_params = [{} for _ in self.tensors]
        if len(self.model_params) != len(self.tensors):
            raise ValueError("model_params must have one mapping per input tensor")
        if self.base_index is not None and not 0 <= self.base_index < len(self.tensors):
            raise ValueError("base_index is out of range")


_SCOPES_OF_ROLE = {"shared": ("shared",), "model": ("input", "non_base"), "base": ("input",)}

Kernel = Callable[[Job], None]
Constraint = Callable[[Mapping[str, Any]], "str | None"]


@dataclass(frozen=True)
class Method:
    """A merge method: its recipe-facing description and its kernel.

    base: "required" (the base is an input with its own role), "optional" (used as the origin when
    given), "ignored" (a base, if listed, is merged like any other input). min/max_models count all
    inputs including the base; min/max_others count the non-base inputs.
    """

    name: str
    pretty_name: str
    paper: str
    inputs: str
    params: tuple[Param, ...]
    base: BasePolicy
    kernel: Kernel
    min_models: int = 1
    max_models: int | None = None
    min_others: int = 0
    max_others: int | None = None
    randomized: bool = False
    constraint: Constraint | None = None
    whole_rows: bool = False  # blocks never cut inside a row (per-row ranks need the whole row)
    scratch: Callable[[int], float] = lambda n: 2.0  # float32 temporaries per entry of a block, n inputs

    def __reduce__(self) -> tuple[Callable[[str], "Method"], tuple[str]]:
        """Pickled by name (a merge plan crosses into a ZeroGPU window's process): the registry's own object."""
        return _registered, (self.name,)

    @property
    def param_names(self) -> frozenset[str]:
        return frozenset(p.name for p in self.params)

    def param(self, name: str) -> Param:
        """The parameter called `name`; RecipeError naming the accepted ones otherwise."""
        for p in self.params:
            if p.name == name:
                return p
        accepted = ", ".join(p.name for p in self.params) or "none"
        raise RecipeError(f"merge method {self.name} has no parameter {name!r}; it accepts: {accepted}")

    def check_inputs(self, n_models: int, has_base: bool) -> str | None:
        """Why this number of inputs (base included) cannot be merged by this method, or None."""
        if self.base == "required" and not has_base:
            return f"{self.name} needs a base_model"
        others = n_models - int(has_base and self.base != "ignored")
        if n_models < self.min_models:
            return f"{self.name} needs at least {self.min_models} models (base included), got {n_models}"
        if self.max_models is not None and n_models > self.max_models:
            return f"{self.name} takes at most {self.max_models} models (base included), got {n_models}"
        if others < self.min_others:
            return f"{self.name} needs at least {self.min_others} models besides the base, got {others}"
        if self.max_others is not None and others > self.max_others:
            return f"{self.name} takes at most {self.max_others} models besides the base, got {others}"
        return None

    def check_values(self, values: Mapping[str, Any]) -> str | None:
        """Why one model's values (its per-model values plus the shared ones) clash, or None."""
        return None if self.constraint is None else self.constraint(values)

    def merge(self, inputs: MergeInputs, max_elements: int | None = None) -> torch.Tensor:
        """Merge whole tensors in memory, cut into blocks of at most `max_elements` entries when given
        (the result is the same bit for bit)."""
        where = f" (tensor {inputs.name})" if inputs.name else ""
        tensors = list(inputs.tensors)
        first = tensors[0]
        if any(t.shape != first.shape or t.device != first.device for t in tensors):
            shapes = [tuple(t.shape) for t in tensors]
            raise ValueError(f"inputs of {self.name}{where} differ in shape or device: {shapes}")
        layout = Layout(first.shape)
        spans = layout.spans(max_elements, self.whole_rows)
        results: list[torch.Tensor] = []

        def emit(span, values: torch.Tensor) -> None:
            if len(spans) == 1:
                results.append(values)
                return
            if not results:
                results.append(torch.empty(first.shape, dtype=torch.float32, device=first.device))
            slice_span(results[0], layout, span).copy_(values)

        self.run(Job(first.shape, len(tensors), spans, lambda i, final: [slice_span(t, layout, spans[i]) for t in tensors],
                     emit, base_index=inputs.base_index, model_params=[dict(v) for v in inputs.model_params],
                     params=dict(inputs.params), name=inputs.name, generator=inputs.generator,
                     device=first.device, workspace=inputs.workspace))
        return results[0]

    def run(self, job: Job) -> None:
        """Check the inputs, fill defaults, coerce values, and run the kernel over the job's blocks."""
        where = f" (tensor {job.name})" if job.name else ""
        base_index = job.base_index if self.base != "ignored" else None
        problem = self.check_inputs(job.n, base_index is not None)
        if problem:
            raise RecipeError(f"{problem}{where}")
        shared = self._resolve(job.params, "shared", where)
        model_params = [
            self._resolve(values, "base" if i == base_index else "model", where)
            for i, values in enumerate(job.model_params)
        ]
        if self.constraint is not None:
            for i, values in enumerate(model_params):
                problem = self.constraint({**shared, **values}) if i != base_index else None
                if problem:
                    raise RecipeError(f"{self.name}: {problem}{where}; adjust the recipe's parameters")
        if self.randomized and job.generator is None:
            raise ValueError(f"{self.name} is randomized and needs MergeInputs.generator")
        job.base_index, job.params, job.model_params = base_index, shared, model_params
        self.kernel(job)

    def _resolve(self, given: Mapping[str, Any], role: str, where: str) -> dict[str, Any]:
        """Complete, typed values for one role: "shared", "model" (a non-base input) or "base"."""
        wanted = [p for p in self.params if p.scope in _SCOPES_OF_ROLE[role]]
        # The base ignores values it does not take (weight, density, ...), as mergekit does:
        # shared recipes often set them on the base.
        ignored = {p.name for p in self.params if p.scope == "non_base"} if role == "base" else set()
        unknown = set(given) - {p.name for p in wanted} - ignored
        if unknown:
            raise RecipeError(
                f"{self.name} does not take {', '.join(sorted(unknown))} here{where}; "
                f"it accepts: {', '.join(p.name for p in wanted) or 'nothing'}"
            )
        out = {}
        for p in wanted:
            if p.name in given:
                out[p.name] = p.coerce(given[p.name])
            elif p.required:
                raise RecipeError(f"{self.name} needs parameter {p.name}{where}; add it to the recipe")
            else:
                out[p.name] = p.default
        return out


def _registered(name: str) -> Method:
    from . import get_method

    return get_method(name)
