"""The compile cache: Triton's compiled kernels kept across starts, per software and device.

A start compiles every kernel variant serving uses (the warm-up,
``engine/warmup.py``); with the cache the next start of the same model and
settings on the same machine, or on a node that mounts the same directory,
loads them instead. Entries live under ``<root>/<key>/triton`` where the key
names FleetLM's, torch's and Triton's versions and the device (name and
compute capability): a cache written by another version or another kind of
GPU sits under another key and is never read. (Triton also hashes each
kernel's source and options into its own file names; the key keeps whole
caches apart and makes them easy to see and delete.)

A finished warm-up leaves a marker ``warmed-<settings>.json`` beside the
kernels, named by a fingerprint of the engine settings that shape what is
compiled (model shape, dtype, batch and token budgets, block size, parallel
sizes, CUDA graphs; not the served name, memory budgets or request limits).
A start finding its marker knows the cache holds every kernel its warm-up
takes (``CompileCache.warm``): the start-time breakdown says so, and
``fleetlm build`` is how an operator fills it ahead of time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Engine settings that change no compiled kernel: left out of the fingerprint.
_NOT_COMPILED = frozenset({"model", "path", "served_name", "seed", "tokenizer", "chat_template", "compile_cache_dir",
                           "warmup", "max_n", "max_logprobs", "gpu_memory_utilization", "cpu_kv_cache_bytes",
                           "num_blocks"})


def settings_fingerprint(config: Any) -> str:
    """A short hash of the ``EngineConfig`` fields that shape what the warm-up compiles
    (a field added later counts unless listed in ``_NOT_COMPILED``: the safe side)."""
    def kept(d: dict) -> dict:
        return {k: kept(v) if isinstance(v, dict) else v for k, v in d.items() if k not in _NOT_COMPILED}

    raw = json.dumps(kept(dataclasses.asdict(config)), sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def cache_key(device: torch.device) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        fleetlm_version = version("fleetlm")
    except PackageNotFoundError:
        fleetlm_version = "dev"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"{torch.cuda.get_device_name(device)}-sm{major}{minor}"
    else:
        where = "cpu"
    raw = f"fleetlm-{fleetlm_version}_torch-{torch.__version__}_triton-{triton_version}_{where}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", raw)


@dataclass(frozen=True)
class CompileCache:
    dir: Path
    key: str
    entries_at_start: int  # kernels already compiled there: > 0 is a warm start
    fingerprint: str | None = None  # of the engine settings (None: not known)
    warm: bool = False  # a finished warm-up of these settings filled this cache before

    @property
    def marker(self) -> Path | None:
        return self.dir / f"warmed-{self.fingerprint}.json" if self.fingerprint else None

    def entries(self) -> int:
        return sum(1 for _ in (self.dir / "triton").iterdir())

    def mark_warm(self, seconds: float) -> None:
        """A warm-up of these settings finished: the cache now holds what it compiled."""
        if self.marker is None:
            return
        tmp = self.marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "warmup_seconds": seconds,
                                   "entries": self.entries()}) + "\n")
        tmp.replace(self.marker)

    def to_dict(self) -> dict:
        return {"dir": str(self.dir), "key": self.key, "entries_at_start": self.entries_at_start,
                "entries": self.entries(), "fingerprint": self.fingerprint, "warm": self.warm}


def use_compile_cache(root: str, device: torch.device, fingerprint: str | None = None) -> CompileCache:
    """Point this process's Triton at ``root``'s directory for this software and device.

    Called in each worker process before its first kernel compiles (Triton
    reads ``TRITON_CACHE_DIR`` when it compiles, so setting it here takes effect).
    """
    key = cache_key(device)
    directory = Path(root).expanduser() / key
    triton_dir = directory / "triton"
    triton_dir.mkdir(parents=True, exist_ok=True)
    manifest = directory / "manifest.json"
    if not manifest.exists():
        manifest.write_text(json.dumps({"key": key, "torch": torch.__version__}) + "\n")
    os.environ["TRITON_CACHE_DIR"] = str(triton_dir)
    entries = sum(1 for _ in triton_dir.iterdir())
    warm = fingerprint is not None and (directory / f"warmed-{fingerprint}.json").is_file()
    return CompileCache(directory, key, entries, fingerprint, warm)
