"""Architecture knowledge: reading the family tables (merger/families.py), legacy layouts, config keys.

Every question the check and the engine ask about a model ("which tensors should a Llama have",
"which ones are vocabulary-sized", "how is the layer count spelled in this config") is answered by
reading the tables, so supporting a family is one table entry, not a hunt through if-chains.
Models are inspected from config.json and safetensors headers only; no tensor data is read.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .errors import ModelError
from .sources import BinReader, TensorHeader, has_safetensors, read_local_headers

from .families import FAMILIES, FAMILY_BY_NAME, LLAMA_LAYER, Family, TensorSpec  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from .recipe import ModelRef

_L = LLAMA_LAYER
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}
_BY_ARCHITECTURE = {a: f for f in FAMILIES for a in f.architectures}

# Non-persistent buffers some old checkpoints contain (causal masks, rotary tables): never merged,
# transformers rebuilds them. The real `attn.c_attn.bias` / `attention.dense.bias` do not match.
_BUFFERS = re.compile(r"(?:rotary_emb\.inv_freq|\.attn\.(?:masked_)?bias|\.attention\.(?:masked_)?bias)$")
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


# ---------------------------------------------------------------- legacy Phi-2 (phi-msft)

@dataclass(frozen=True)
class LegacyTensor:
    """A canonical (new-layout) tensor and where it lives in the legacy checkpoint."""

    canonical: str
    source: str
    qkv_part: int | None = None  # 0/1/2: the q, k or v rows of a fused Wqkv


_LEGACY_SRC = "transformer.h.{i}."
PHI_MSFT_TENSORS: tuple[LegacyTensor, ...] = (
    LegacyTensor("model.embed_tokens.weight", "transformer.embd.wte.weight"),
    *(LegacyTensor(f"{_L}{new}.{p}", f"{_LEGACY_SRC}{old}.{p}")
      for new, old in (("input_layernorm", "ln"), ("self_attn.dense", "mixer.out_proj"),
                       ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
      for p in ("weight", "bias")),
    *(LegacyTensor(f"{_L}self_attn.{proj}_proj.{p}", f"{_LEGACY_SRC}mixer.Wqkv.{p}", part)
      for part, proj in enumerate("qkv") for p in ("weight", "bias")),
    *(LegacyTensor(f"{new}.{p}", f"{old}.{p}")
      for new, old in (("model.final_layernorm", "lm_head.ln"), ("lm_head", "lm_head.linear"))
      for p in ("weight", "bias")),
)
PHI_MSFT_MARKER = "transformer.embd.wte.weight"


def is_phi_msft_config(config: dict) -> bool:
    """The remote-code Phi-2 config: model_type phi-msft, or a phi config spelled with n_embd/n_layer."""
    model_type = config.get("model_type")
    return model_type == "phi-msft" or (model_type == "phi" and "n_embd" in config and "n_layer" in config)


def convert_phi_msft_config(config: dict) -> dict:
    """Rewrite a phi-msft config as the transformers-native `phi` config (no remote code needed)."""
    try:
        hidden, heads, layers = config["n_embd"], config["n_head"], config["n_layer"]
    except KeyError as e:
        raise ModelError(f"this phi-msft config has no {e.args[0]}; use the config.json of the model") from None
    new = {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": config.get("vocab_size", 51200),
        "hidden_size": hidden,
        "intermediate_size": config.get("n_inner") or 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": config.get("n_head_kv") or heads,
        "max_position_embeddings": config.get("n_positions", 2048),
        "partial_rotary_factor": config.get("rotary_dim", hidden // heads) / (hidden / heads),
        "rope_theta": 10000.0,
        "layer_norm_eps": config.get("layer_norm_epsilon", 1e-5),
        "hidden_act": config.get("activation_function", "gelu_new"),
        "resid_pdrop": config.get("resid_pdrop", 0.0),
        "embd_pdrop": config.get("embd_pdrop", 0.0),
        "attention_dropout": config.get("attn_pdrop", 0.0),
        "initializer_range": config.get("initializer_range", 0.02),
        "qk_layernorm": False,
        "tie_word_embeddings": False,
        "use_cache": True,
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype"):
        if config.get(key) is not None:
            new[key] = config[key]
    return new


def _phi_msft_tensors(config: dict, headers: dict[str, TensorHeader]) -> tuple[dict[str, "TensorRef"], list[str]]:
    """Canonical phi tensors read from a legacy checkpoint; Wqkv split into q/k/v row ranges."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = hidden // heads
    q_rows, kv_rows = heads * head_dim, config.get("num_key_value_heads", heads) * head_dim
    parts = ((0, q_rows), (q_rows, q_rows + kv_rows), (q_rows + kv_rows, q_rows + 2 * kv_rows))
    layers = sorted({i for n in headers if (i := layer_index(n)) is not None})
    tensors: dict[str, TensorRef] = {}
    used: set[str] = set()
    for spec in PHI_MSFT_TENSORS:
        for i in (layers if "{i}" in spec.source else [None]):
            source = spec.source.format(i=i)
            h = headers.get(source)
            if h is None:
                continue
            used.add(source)
            name = spec.canonical.format(i=i)
            if spec.qkv_part is None:
                tensors[name] = TensorRef(source, None, h.dtype, h.shape)
                continue
            if h.shape[0] != parts[2][1]:
                raise ModelError(f"{source} has {h.shape[0]} rows but {heads} heads of {head_dim} "
                                 f"need {parts[2][1]}; the config does not match the weights")
            start, stop = parts[spec.qkv_part]
            tensors[name] = TensorRef(source, (start, stop), h.dtype, (stop - start, *h.shape[1:]))
    return tensors, sorted(n for n in headers if n not in used and not _BUFFERS.search(n))


# ---------------------------------------------------------------- model inspection

@dataclass(frozen=True)
class TensorRef:
    """How to read one canonical tensor: its name in the files and, for fused tensors, a row range."""

    source_name: str
    rows: tuple[int, int] | None
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]  # the canonical shape (rows applied)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@dataclass
class ModelInfo:
    """One model as the check and the engine see it: canonical config and tensors, sizes, layout."""

    ref: "ModelRef | str"
    config: dict[str, Any]  # canonical: a legacy phi config is converted to `phi`
    original_config: dict[str, Any]
    family: Family | None
    architecture: str
    model_type: str | None
    num_layers: int
    hidden_size: int | None
    vocab_size: int | None  # from the config
    embedding_rows: int | None  # rows of the input embedding on disk
    tie_word_embeddings: bool
    dtype: str | None  # torch name of the dominant stored dtype
    param_count: int
    size_bytes: int
    layout: str
    converted: bool
    remote_code: bool  # the original config has auto_map
    tensors: dict[str, TensorRef]
    files: list[str]
    num_heads: int | None = None
    missing: list[str] = field(default_factory=list)  # required by the family table, absent here
    unexpected: list[str] = field(default_factory=list)  # present, but unknown to the family table

    @property
    def name(self) -> str:
        return str(self.ref)


def find_family(config: dict) -> Family | None:
    """The family of a (canonical) config: by model_type first, then by architecture name."""
    family = _BY_MODEL_TYPE.get(config.get("model_type"))
    if family is None:
        for arch in config.get("architectures") or ():
            family = family or _BY_ARCHITECTURE.get(arch)
    return family


def _config_value(config: dict, keys: Sequence[str]) -> Any:
    return next((config[k] for k in keys if config.get(k) is not None), None)


def expected_tensors(family: Family, num_layers: int, num_experts: int = 0) -> dict[str, bool]:
    """Every tensor name the family table predicts for this size, mapped to `optional`."""
    out: dict[str, bool] = {}
    for spec in family.pre + family.post:
        out[spec.template] = spec.optional
    for i in range(num_layers):
        for spec in family.layer:
            for e in (range(num_experts) if "{e}" in spec.template else [0]):
                out[spec.template.format(i=i, e=e)] = spec.optional
    return out


def _canonical_name(family: Family | None, name: str) -> str:
    """Hub checkpoints' names, with the spellings some savers use mapped to one canonical name."""
    if family is None:
        return name
    name = dict(family.aliases).get(name, name)
    prefix = family.optional_prefix
    if prefix and not name.startswith(prefix) and not name.startswith("lm_head."):
        return prefix + name
    return name


def _fused_parts(family: Family | None, name: str, h: TensorHeader) -> dict[str, TensorRef] | None:
    """The canonical tensors a fused expert tensor holds (see Family.fused), or None if it is not one."""
    for source, parts in family.fused if family else ():
        m = re.fullmatch(re.escape(source).replace(re.escape("{i}"), r"(\d+)"), name)
        if m is None:
            continue
        i = int(m.group(1))
        if len(h.shape) == 2 and len(parts) == 1:
            return {parts[0].format(i=i): TensorRef(name, None, h.dtype, h.shape)}
        if len(h.shape) != 3 or h.shape[1] % len(parts):
            raise ModelError(f"{name} has shape {list(h.shape)}; a fused expert tensor is (experts, rows, columns) "
                             f"with rows for {len(parts)} parts")
        experts, rows, cols = h.shape
        per = rows // len(parts)
        return {part.format(i=i, e=e): TensorRef(name, (e * rows + k * per, e * rows + (k + 1) * per), h.dtype,
                                                 (per, cols))
                for e in range(experts) for k, part in enumerate(parts)}
    return None


def model_info_from(config: dict, headers: dict[str, TensorHeader], ref: "ModelRef | str") -> ModelInfo:
    """Inspect a model from its config.json and safetensors headers (no tensor data)."""
    original = copy.deepcopy(config)
    legacy_tensors = PHI_MSFT_MARKER in headers
    legacy_config = is_phi_msft_config(config)
    canonical = convert_phi_msft_config(config) if legacy_config else copy.deepcopy(config)
    if legacy_tensors and not legacy_config and canonical.get("model_type") != "phi":
        raise ModelError(f"{ref} has Phi-2 legacy tensors (transformer.embd.wte) but a "
                         f"{canonical.get('model_type')} config; use the config that came with the weights")
    family = find_family(canonical)
    tie = bool(canonical.get("tie_word_embeddings", family.tie_default if family else False))
    if legacy_tensors:
        tensors, unexpected = _phi_msft_tensors(canonical, headers)
    else:
        tensors = {}
        for n, h in headers.items():
            if not _BUFFERS.search(n):
                plain = {_canonical_name(family, n): TensorRef(n, None, h.dtype, h.shape)}
                tensors.update(_fused_parts(family, n, h) or plain)
        unexpected = []
    if family is not None and tie:
        tensors.pop(family.head[0], None)  # tied: transformers reuses the input embedding

    keys = (family.layers_keys if family else ("num_hidden_layers", "n_layer", "num_layers"))
    num_layers = _config_value(canonical, keys)
    if num_layers is None:
        prefix = family.layer_prefix if family else ""
        num_layers = 1 + max((i for n in tensors if n.startswith(prefix) and (i := layer_index(n)) is not None),
                             default=-1)
    missing: list[str] = []
    if family is not None:
        keys = (family.experts_key,) if isinstance(family.experts_key, str) else family.experts_key or ()
        experts = _config_value(canonical, keys) or 0
        expected = expected_tensors(family, num_layers, experts)
        if tie:
            expected.pop(family.head[0], None)
        missing = [n for n, optional in expected.items() if not optional and n not in tensors]
        unexpected += [n for n in tensors if n not in expected]

    embedding = tensors.get(family.embedding) if family else None
    by_bytes: Counter[str] = Counter()
    for h in headers.values():
        if h.dtype in _TORCH_NAMES:
            by_bytes[h.dtype] += h.end - h.begin
    dtype = (_TORCH_NAMES[by_bytes.most_common(1)[0][0]] if by_bytes
             else canonical.get("dtype") or canonical.get("torch_dtype"))
    if legacy_tensors or legacy_config:
        layout = "phi-msft (legacy, converted)"
    elif family is not None:
        layout = f"{family.name} (new)" if family.name == "phi" else family.name
    else:
        layout = "unknown (inferred from headers)"
    return ModelInfo(
        ref=ref, config=canonical, original_config=original, family=family,
        architecture=(canonical.get("architectures") or [family.architectures[0] if family else "unknown"])[0],
        model_type=canonical.get("model_type"), num_layers=int(num_layers),
        hidden_size=_config_value(canonical, family.hidden_keys if family else ("hidden_size", "n_embd", "d_model")),
        vocab_size=_config_value(canonical, family.vocab_keys if family else ("vocab_size",)),
        embedding_rows=embedding.shape[0] if embedding else None,
        tie_word_embeddings=tie, dtype=dtype,
        param_count=sum(t.numel for t in tensors.values()),
        size_bytes=sum(h.end - h.begin for h in headers.values()),
        layout=layout, converted=legacy_tensors or legacy_config, remote_code="auto_map" in original,
        tensors=tensors, files=sorted({h.file for h in headers.values()}),
        num_heads=_config_value(canonical, family.heads_keys if family else ("num_attention_heads", "n_head")),
        missing=missing, unexpected=sorted(unexpected),
    )


def read_config(folder: str | Path) -> dict[str, Any]:
    """config.json of a local model folder, as a dict."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{folder} has no config.json; is it a model folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(f"{path} is not valid JSON; download the model again") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path} is not a JSON object; download the model again")
    return config


def inspect_local(folder: str | Path, *, ref: "ModelRef | str | None" = None, allow_bin: bool = False,
                  check_size: bool = True) -> ModelInfo:
    """Inspect a local model folder: config.json and safetensors headers only (`.bin`: when allowed).

    check_size=False (the pre-flight check) accepts header-only files; the merge itself always checks
    that every tensor's bytes are in its file.
    """
    folder = Path(folder)
    config = read_config(folder)
    if has_safetensors(folder) or not any(folder.glob("*.bin")):
        headers = read_local_headers(folder, check_size=check_size)
    elif allow_bin:
        headers = BinReader(folder).headers
    else:
        raise ModelError(f"{folder.name} has only pickle .bin weights; pass --allow-bin to load them with "
                         "torch's safe weights-only loader, or use a safetensors version")
    return model_info_from(config, headers, ref if ref is not None else str(folder))


# ---------------------------------------------------------------- helpers for the engine

def layer_index(name: str) -> int | None:
    """The layer a tensor belongs to (the first `.N.` in its name), None for embeddings and heads."""
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def rename_layer(name: str, new_index: int) -> str:
    """The same tensor in another layer, for passthrough frankenmerges that renumber layers."""
    m = _LAYER_INDEX.search(name)
    if m is None:
        raise ValueError(f"{name} is not a per-layer tensor")
    return f"{name[:m.start(1)]}{new_index}{name[m.end(1):]}"


def is_embedding(info: ModelInfo, name: str) -> bool:
    """True for the vocabulary-sized tensors (input embedding, output head), whose rows are tokens."""
    if info.family is not None:
        return name in info.family.vocab_tensors
    ref = info.tensors.get(name)
    return (ref is not None and layer_index(name) is None and len(ref.shape) >= 1
            and ref.shape[0] == info.vocab_size)


_PER_LAYER_LISTS = ("layer_types",)


def output_config(base_config: dict, *, num_layers: int, vocab_size: int | None, dtype: str | None,
                  tie_word_embeddings: bool | None = None, layer_sources: Sequence[int] | None = None) -> dict:
    """The merged model's config.json: layer count, vocab size, dtype and tying updated, like mergekit.

    `dtype` is a torch name ("bfloat16") or a safetensors one ("BF16").
    `layer_sources` (for passthrough) gives each output layer's layer index in the base config, so
    per-layer lists such as `layer_types` follow their layers; without it a list of the wrong
    length is dropped and transformers rebuilds its default.
    """
    config = copy.deepcopy(base_config)
    family = find_family(config)
    keys = family.layers_keys if family else ("num_hidden_layers", "n_layer", "num_layers")
    present = [k for k in keys if k in config] or [keys[0]]
    for key in present:
        config[key] = num_layers
    if vocab_size is not None:
        config[(family.vocab_keys if family else ("vocab_size",))[0]] = vocab_size
    if dtype is not None:
        config["torch_dtype"] = config["dtype"] = _TORCH_NAMES.get(dtype, dtype)
    if tie_word_embeddings is not None:
        config["tie_word_embeddings"] = tie_word_embeddings
    if family is not None:
        config.pop("auto_map", None)  # transformers has a native implementation; remote code is not needed
    for key in _PER_LAYER_LISTS:
        values = config.get(key)
        if not isinstance(values, list):
            continue
        if layer_sources is not None and all(0 <= s < len(values) for s in layer_sources):
            config[key] = [values[s] for s in layer_sources]
        elif len(values) != num_layers:
            del config[key]
    return config
