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
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch


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

    def to_dict(self) -> dict:
        return {"dir": str(self.dir), "key": self.key, "entries_at_start": self.entries_at_start}


def use_compile_cache(root: str, device: torch.device) -> CompileCache:
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
    return CompileCache(directory, key, entries)
