"""The pipeline's side of streamed parents: when to stream, pinning once, and the readers of a plan.

A Hub parent is resolved to a commit sha once (`pin_parents`); the pre-flight check reads its config
and headers from that pin and the merge streams its tensors from the same sha, so what was checked is
what gets merged. Only the small files (configs, tokenizer) go to the Hugging Face cache; the weights
are read by range requests (merger.remote) while the merge runs, so the disk holds only the output.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from . import architecture as arch
from .errors import MergerError
from .recipe import ModelRef, Recipe
from .remote import RemoteTensorReader
from .sources import open_reader


def pin_parents(recipe: Recipe, *, token: str | None) -> dict[ModelRef, Any]:
    """Each Hub model of the recipe resolved to one commit, with its config and headers (hub.RemoteMetadata).

    Errors are left to the check, which reports them with the rest (a model missing here is simply absent).
    """
    from .hub import read_metadata, resolve

    pinned = {}
    for ref in recipe.referenced_models():
        if ref.local:
            continue
        try:
            pinned[ref] = read_metadata(resolve(ref, token=token), token=token)
        except MergerError:
            continue
    return pinned


def pinned_inspector(pinned: Mapping[ModelRef, Any], *, token: str | None, allow_bin: bool):
    """A check inspector that answers pinned Hub models from their pin (no second resolve)."""
    from .check import Inspection, default_inspector

    fallback = default_inspector(token=token, allow_bin=allow_bin)

    def inspect(ref: ModelRef) -> Inspection:
        meta = pinned.get(ref)
        if meta is None:
            return fallback(ref)
        found = Inspection(arch.model_info_from(meta.config, meta.headers, ref), meta.model.access,
                           meta.model.license)
        if ref.lora is not None:  # the adapter must fit the pinned model (config and header only)
            from .check import _with_adapter

            return _with_adapter(ref, found, token)
        return found
    return inspect


def small_files(meta: Any, *, token: str | None) -> Path:
    """The pinned model's configs and tokenizer files in the cache (no weights); its snapshot folder."""
    from .hub import download

    return download(meta.model, token=token, weights=False)


def read_order(plan: Any) -> dict[ModelRef, list[tuple[str, tuple[int, int] | None]]]:
    """The reads the engine will make of each model, in plan order (for read-ahead)."""
    order: dict[ModelRef, list[tuple[str, tuple[int, int] | None]]] = {}
    for out in plan.outputs:
        for s in out.sources:
            order.setdefault(s.model, []).append((s.ref.source_name, s.ref.rows))
    return order


def stream_readers(metas: Mapping[ModelRef, Any], folders: Mapping[ModelRef, Path], *, token: str | None,
                   allow_bin: bool, cancel: threading.Event | None
                   ) -> Callable[[Any], dict[ModelRef, Any]]:
    """For merge_local: the readers of a plan, streamed for the models in `metas`, local files otherwise."""
    from .hub import hub_endpoint

    def open_readers(plan: Any) -> dict[ModelRef, Any]:
        readers: dict[ModelRef, Any] = {}
        order = read_order(plan)
        try:
            for ref, folder in folders.items():
                meta = metas.get(ref)
                if meta is None:
                    readers[ref] = open_reader(folder, allow_bin=allow_bin)
                    continue
                reader = RemoteTensorReader(meta.model.repo_id, meta.model.sha, meta.headers, token=token,
                                            endpoint=hub_endpoint(),
                                            cancelled=lambda: bool(cancel and cancel.is_set()))
                readers[ref] = reader
                reader.expect(order.get(ref, []))
        except BaseException:
            for r in readers.values():
                r.close()
            raise
        return readers
    return open_readers


def streamed_infos(metas: Mapping[ModelRef, Any], folders: Mapping[ModelRef, Path], *,
                   allow_bin: bool) -> dict[ModelRef, arch.ModelInfo]:
    """ModelInfo of every model: from the pinned config and headers when streamed, else the local folder."""
    return {ref: arch.model_info_from(metas[ref].config, metas[ref].headers, ref) if ref in metas
            else arch.inspect_local(folder, ref=ref, allow_bin=allow_bin)
            for ref, folder in folders.items()}
