"""The contract between a merge method and its callers: parameters, inputs, and the method record.

A method is data (its parameters, its input rules, its paper) plus one kernel: a pure function from
`MergeInputs` to a float32 tensor. The recipe parser reads the data to refuse bad recipes before any
download; the engine calls `Method.merge` once per output tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from merger.errors import RecipeError

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
    """Everything a kernel sees for one output tensor.

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

    @property
    def base(self) -> torch.Tensor:
        assert self.base_index is not None, "kernel called without a base; Method.merge checks this"
        return self.tensors[self.base_index]

    @property
    def other_indices(self) -> list[int]:
        return [i for i in range(len(self.tensors)) if i != self.base_index]

    def values(self, name: str, indices: Sequence[int]) -> list[Any]:
        """The per-model values of parameter `name` for the inputs at `indices`."""
        return [self.model_params[i][name] for i in indices]

    def buffer(self, key: str, shape: Sequence[int]) -> torch.Tensor:
        """An uninitialised float32 tensor for a kernel's result or scratch, on the inputs' device.

        The engine supplies a workspace that hands back the same memory for the same key on every
        tensor (fresh allocations of this size cost more in page faults than the arithmetic); it
        copies a result out of it before the next tensor. Without one, a new tensor.
        """
        if self.workspace is None:
            return torch.empty(tuple(shape), dtype=torch.float32, device=self.tensors[0].device)
        return self.workspace(key, tuple(shape))

    def draw_uniform(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """Uniform [0, 1) samples from the generator's own device, moved to `device`."""
        if self.generator is None:
            raise ValueError(f"a randomized method needs MergeInputs.generator (tensor {self.name})")
        samples = torch.rand(shape, generator=self.generator, device=self.generator.device)
        return samples.to(device)


_SCOPES_OF_ROLE = {"shared": ("shared",), "model": ("input", "non_base"), "base": ("input",)}

Kernel = Callable[[MergeInputs], torch.Tensor]
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

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        """Check the inputs, fill defaults, coerce values, and run the kernel."""
        where = f" (tensor {inputs.name})" if inputs.name else ""
        base_index = inputs.base_index if self.base != "ignored" else None
        problem = self.check_inputs(len(inputs.tensors), base_index is not None)
        if problem:
            raise RecipeError(f"{problem}{where}")
        first = inputs.tensors[0]
        if any(t.shape != first.shape or t.device != first.device for t in inputs.tensors):
            shapes = [tuple(t.shape) for t in inputs.tensors]
            raise ValueError(f"inputs of {self.name}{where} differ in shape or device: {shapes}")
        shared = self._resolve(inputs.params, "shared", where)
        model_params = [
            self._resolve(values, "base" if i == base_index else "model", where)
            for i, values in enumerate(inputs.model_params)
        ]
        if self.constraint is not None:
            for i, values in enumerate(model_params):
                problem = self.constraint({**shared, **values}) if i != base_index else None
                if problem:
                    raise RecipeError(f"{self.name}: {problem}{where}; adjust the recipe's parameters")
        if self.randomized and inputs.generator is None:
            raise ValueError(f"{self.name} is randomized and needs MergeInputs.generator")
        resolved = replace(inputs, base_index=base_index, params=shared, model_params=model_params)
        return self.kernel(resolved)

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
