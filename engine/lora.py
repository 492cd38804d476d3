"""LoRA adapters on the engine's side: the request, the limits, and the checks of a PEFT directory.

``LoRARequest(lora_name, lora_int_id, lora_path)`` (vLLM's names) picks an
adapter per request. ``read_adapter`` checks a PEFT adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``, as
``PeftModel.save_pretrained`` writes it) against the model and the engine's
limits without loading a tensor: the config's ``r``, ``lora_alpha``,
``use_rslora``, ``bias``, and every tensor's name and shape (read from the
safetensors header). Anything the engine cannot run exactly is a
``LoRAAdapterError`` naming the problem (the HTTP layer makes it a 400).
The workers load the tensors themselves (``workers/lora_manager.py``).

Torch-free: the ingress and the scheduler import this module.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from fleetlm.engine.config import LoRAConfig, ModelConfig
from fleetlm.engine.step import LoRAAdapter

# The projections an adapter may target, by PEFT's module names (Llama family).
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
# base_model.model.model.layers.<i>.<self_attn|mlp>.<module>.lora_<A|B>.weight
_TENSOR = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_HUB_ID = re.compile(r"[\w][\w.-]*/[\w.-]+")
_MAX_HEADER_BYTES = 64 << 20
_FLOAT_DTYPES = ("F32", "F16", "BF16")


class LoRAAdapterError(ValueError):
    """An adapter the engine cannot serve (bad files, too high a rank, a module the model lacks)."""


@dataclass(frozen=True)
class LoRARequest:
    """Which adapter a request runs with (vLLM's fields).

    ``lora_int_id`` identifies the adapter inside an engine (> 0, one id per
    adapter); ``lora_path`` is a local PEFT directory, or a hub id when the
    machine is online.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer > 0, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"lora_path of adapter {self.lora_name!r} must name a PEFT adapter directory")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    @property
    def cache_key(self) -> str:
        """The prefix cache's extra key: blocks computed under one adapter never serve another."""
        return f"lora:{self.lora_int_id}"


@dataclass(frozen=True)
class AdapterSpec:
    """A checked adapter: what the workers need to load it."""

    request: LoRARequest
    dir: str  # the local directory
    rank: int
    scaling: float  # lora_alpha / r (or / sqrt(r) with use_rslora)
    targets: frozenset[str]  # PEFT module names it adapts
    num_tensors: int

    @property
    def adapter(self) -> LoRAAdapter:
        """What the scheduler and the workers carry of it."""
        r = self.request
        return LoRAAdapter(r.lora_int_id, r.lora_name, self.dir, self.scaling)


def module_shapes(model: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target module, unsharded."""
    h, q, kv = model.hidden_size, model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    inter = int(model.get("intermediate_size"))
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def resolve_adapter_dir(lora_request: LoRARequest) -> Path:
    """The local directory of an adapter: the path itself, or a hub id's download (online only)."""
    path = Path(lora_request.lora_path).expanduser()
    if path.is_dir():
        return path
    name = lora_request.lora_name
    if path.exists():
        raise LoRAAdapterError(f"adapter {name!r}: {lora_request.lora_path} is not a directory")
    if not _HUB_ID.fullmatch(lora_request.lora_path) or lora_request.lora_path.startswith(("/", ".", "~")):
        raise LoRAAdapterError(f"adapter {name!r}: no such directory {lora_request.lora_path}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(lora_request.lora_path,
                                      allow_patterns=["adapter_config.json", "adapter_model.safetensors"]))
    except Exception as e:  # noqa: BLE001 - offline, gated, missing: all the client's to fix
        raise LoRAAdapterError(f"adapter {name!r}: {lora_request.lora_path} is neither a local directory nor a "
                               f"hub id that could be fetched ({type(e).__name__}: {str(e)[:200]})") from None


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise LoRAAdapterError(f"{path.name} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER_BYTES:
                raise LoRAAdapterError(f"{path.name} is not a safetensors file (header of {n} bytes)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoRAAdapterError(f"cannot read {path.name}: {e}") from None
    if not isinstance(header, dict):
        raise LoRAAdapterError(f"{path.name} is not a safetensors file")
    header.pop("__metadata__", None)
    return header


def _config(directory: Path, name: str) -> dict:
    file = directory / "adapter_config.json"
    if not file.is_file():
        raise LoRAAdapterError(f"adapter {name!r}: {directory} has no adapter_config.json (not a PEFT adapter)")
    try:
        cfg = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoRAAdapterError(f"adapter {name!r}: adapter_config.json is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise LoRAAdapterError(f"adapter {name!r}: adapter_config.json must hold an object")
    return cfg


def _module_of(key: str) -> str:
    """The module a PEFT tensor belongs to: ``...lm_head.base_layer.weight`` -> ``lm_head``."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.startswith(("lora_", "base_layer")) or part in ("weight", "bias"):
            return parts[i - 1] if i else key
    return key


def _check_config(cfg: dict, name: str) -> tuple[int, float]:
    """(r, scaling) of a PEFT LoRA config; refuses what would not run exactly."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoRAAdapterError(f"adapter {name!r}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise LoRAAdapterError(f"adapter {name!r}: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise LoRAAdapterError(f"adapter {name!r}: lora_alpha must be a positive number, got {alpha!r}")
    if cfg.get("bias", "none") != "none":
        raise LoRAAdapterError(f"adapter {name!r}: bias {cfg.get('bias')!r} is not supported (only 'none')")
    for key in ("use_dora", "fan_in_fan_out"):
        if cfg.get(key):
            raise LoRAAdapterError(f"adapter {name!r}: {key}=true is not supported")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "target_parameters", "trainable_token_indices"):
        if cfg.get(key):
            raise LoRAAdapterError(f"adapter {name!r}: {key} is not supported (one r and lora_alpha for every module)")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in TARGET_MODULES]
        if unknown:
            raise LoRAAdapterError(f"adapter {name!r} targets {', '.join(map(repr, unknown))}, which FleetLM cannot "
                                   f"apply: target modules must be among {', '.join(TARGET_MODULES)}")
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return r, float(scaling)


def read_adapter(lora_request: LoRARequest, model: ModelConfig, config: LoRAConfig) -> AdapterSpec:
    """Check a PEFT adapter against ``model`` and ``config`` (no tensor is read); raise LoRAAdapterError."""
    name = lora_request.lora_name
    directory = resolve_adapter_dir(lora_request)
    r, scaling = _check_config(_config(directory, name), name)
    if r > config.max_lora_rank:
        raise LoRAAdapterError(f"adapter {name!r} has rank {r}, above max_lora_rank ({config.max_lora_rank}); "
                               f"start the engine with max_lora_rank >= {r}")
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        extra = " (.bin adapters are pickles and are not loaded)" if (directory / "adapter_model.bin").exists() else ""
        raise LoRAAdapterError(f"adapter {name!r}: {directory} has no adapter_model.safetensors{extra}")
    header = read_safetensors_header(weights)
    shapes = module_shapes(model)
    targets, seen = set(), set()
    for key, meta in header.items():
        m = _TENSOR.match(key)
        if m is None:
            raise LoRAAdapterError(f"adapter {name!r} adapts {_module_of(key)!r} ({key}), which FleetLM cannot "
                                   f"apply: target modules must be among {', '.join(TARGET_MODULES)}")
        layer, block, module, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if module not in shapes or (block == "self_attn") != (module in _ATTN):
            raise LoRAAdapterError(f"adapter {name!r} targets {block}.{module}, which the model lacks: "
                                   f"target modules must be among {', '.join(TARGET_MODULES)}")
        if layer >= model.num_layers:
            raise LoRAAdapterError(f"adapter {name!r} adapts layer {layer}, the model has {model.num_layers}")
        if not isinstance(meta, dict) or meta.get("dtype") not in _FLOAT_DTYPES:
            raise LoRAAdapterError(f"adapter {name!r}: tensor {key} must be F32, F16 or BF16")
        d_in, d_out = shapes[module]
        want = [r, d_in] if ab == "A" else [d_out, r]
        if list(meta.get("shape", ())) != want:
            raise LoRAAdapterError(f"adapter {name!r}: {key} has shape {meta.get('shape')}, expected {want} "
                                   f"(r={r} and the model's {module})")
        targets.add(module)
        seen.add((layer, module, ab))
    for layer, module, ab in seen:
        if (layer, module, "B" if ab == "A" else "A") not in seen:
            raise LoRAAdapterError(f"adapter {name!r}: layer {layer} {module} has lora_{ab} without its pair")
    if not targets:
        raise LoRAAdapterError(f"adapter {name!r}: adapter_model.safetensors holds no LoRA tensors")
    return AdapterSpec(lora_request, str(directory), r, scaling, frozenset(targets), len(header))


class LoRARegistry:
    """An engine's adapters, by ``lora_int_id``: each checked once, read by the workers when added,
    its device slot freed when removed (``slots``: the scheduler's ``LoRASlots``)."""

    def __init__(self, model: ModelConfig, config: LoRAConfig, slots=None, workers=None) -> None:
        self.model, self.config = model, config
        self.slots, self.workers = slots, workers
        self.specs: dict[int, AdapterSpec] = {}

    def check(self, lora_request: LoRARequest) -> AdapterSpec:
        """The adapter's spec; an id already used by another adapter (name or path) is an error."""
        spec = self.specs.get(lora_request.lora_int_id)
        if spec is not None:
            known = spec.request
            if (known.lora_name, known.lora_path) != (lora_request.lora_name, lora_request.lora_path):
                raise LoRAAdapterError(
                    f"lora_int_id {lora_request.lora_int_id} already names adapter {known.lora_name!r} "
                    f"({known.lora_path}); each adapter needs its own id")
            return spec
        spec = read_adapter(lora_request, self.model, self.config)
        self.specs[lora_request.lora_int_id] = spec
        return spec

    def add(self, lora_request: LoRARequest) -> bool:
        """Check it and have the workers read it into host memory; False if it was added before."""
        known = lora_request.lora_int_id in self.specs
        spec = self.check(lora_request)
        if not known:
            try:
                self.workers.add_lora(spec.adapter)
            except ValueError as e:  # a worker could not read it after all (a file gone, unreadable)
                self.specs.pop(lora_request.lora_int_id, None)
                raise LoRAAdapterError(f"adapter {lora_request.lora_name!r} could not be read: {e}") from None
        return not known

    def remove(self, lora_int_id: int) -> bool:
        """Forget it: requests running with it finish with it, then its slot is freed (engine thread only)."""
        if self.specs.pop(lora_int_id, None) is None:
            return False
        if self.slots is not None:
            self.slots.retire(lora_int_id)
            self.workers.remove_lora(lora_int_id)
        return True

    def stats(self) -> dict:
        """For ``EngineStats``; read from other threads too (the slot table is a fixed-size list)."""
        s = self.slots
        resident = [a for a in list(s.adapter) if a is not None]
        return dict(lora_resident=tuple(a.lora_name for a in resident),
                    lora_resident_ids=tuple(a.lora_int_id for a in resident),
                    lora_known_ids=tuple(sorted(self.ids())), lora_loads=s.num_loads, lora_evictions=s.num_evictions)

    def ids(self) -> set[int]:
        for _ in range(5):  # read from other threads while the engine thread adds or removes
            try:
                return set(self.specs)
            except RuntimeError:
                continue
        return set()
