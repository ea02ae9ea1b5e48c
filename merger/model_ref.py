"""A model named in a recipe: `org/name[@revision]`, a local folder, either with `+adapter` (LoRA)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import recipe_compat as compat
from .errors import RecipeError
from .recipe_yaml import _short

_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[/\\]")  # 'D:/models/x' in recipes written on Windows
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")


@dataclass(frozen=True)
class ModelRef:
    """A model named in a recipe: a Hub repo (optionally at a revision) or a local folder, optionally
    with a LoRA adapter applied to it (mergekit's `model+adapter`; repo/revision/local are the model's)."""

    repo: str
    revision: str | None = None
    local: bool = False
    lora: "ModelRef | None" = None

    def __str__(self) -> str:
        text = f"{self.repo}@{self.revision}" if self.revision else self.repo
        return f"{text}+{self.lora}" if self.lora is not None else text

    @property
    def model(self) -> "ModelRef":
        """The model without its adapter."""
        return ModelRef(self.repo, self.revision, self.local) if self.lora is not None else self

    @property
    def display_name(self) -> str:
        name = Path(self.repo).name if self.local else self.repo
        return f"{name}+{self.lora.display_name}" if self.lora is not None else name


def parse_model_ref(value: Any, where: str, *, allow_local: bool, base_dir: Path | None = None,
                    adapter: bool = False) -> ModelRef:
    """`org/name`, `org/name@revision` or a local folder (refused when allow_local is False), each
    optionally followed by `+adapter` (a LoRA adapter repo or folder, mergekit's syntax)."""
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where} must be a Hub repo ID like 'org/name' or a local folder, not {compat.kind(value)}")
    text = value.strip()
    if "+" in text and not adapter and not os.path.exists(text):
        model, *loras = text.split("+")
        if len(loras) != 1 or not model.strip() or not loras[0].strip():
            raise RecipeError(f"{where}: '{_short(text)}' is not 'model+adapter' (mergekit's syntax for a LoRA "
                              "adapter applied to a model: one '+' between the two)")
        base = parse_model_ref(model, where, allow_local=allow_local, base_dir=base_dir)
        lora = parse_model_ref(loras[0], f"{where} (its LoRA adapter)", allow_local=allow_local, base_dir=base_dir,
                               adapter=True)
        return ModelRef(base.repo, base.revision, base.local, lora)
    looks_local = text.startswith(("/", "./", "../", "~", "file:")) or "\\" in text or _WINDOWS_DRIVE.match(text)
    if not looks_local and allow_local:
        candidate = (base_dir / text) if base_dir and not os.path.isabs(text) else Path(text)
        looks_local = candidate.is_dir() and (candidate / ("adapter_config.json" if adapter else "config.json")).exists()
    if looks_local:
        if not allow_local:
            raise RecipeError(f"{where}: local paths are not allowed here ('{_short(text)}'); "
                              "name models by their Hub repo ID, like 'org/name'")
        if text.startswith("file:"):
            raise RecipeError(f"{where}: file URLs are not supported ('{_short(text)}'); give the folder path")
        path = Path(os.path.expanduser(text))
        if base_dir and not path.is_absolute():
            path = base_dir / path
        return ModelRef(str(path.resolve()), None, True)
    repo, _, revision = text.partition("@")
    if not _HUB_ID.fullmatch(repo) or ".." in repo or repo.endswith((".git", ".")):  # fullmatch: no "\n" before $
        raise RecipeError(f"{where}: '{_short(text)}' is not a Hub repo ID (expected 'org/name' or "
                          "'org/name@revision') nor an existing local model folder")
    if "@" in text and not _REVISION.fullmatch(revision):
        raise RecipeError(f"{where}: revision '{_short(revision)}' is not a valid branch, tag or commit")
    return ModelRef(repo, revision or None, False)

