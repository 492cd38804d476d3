"""Benchmark records: what ran where (card, versions, commit, date, config) beside its figures, as JSON.

Every record is ``{benchmark, card, num_devices, versions, commit, date,
config, figures}``, written to ``<name>-<UTC time>.json`` in the current
directory (or ``results_dir``, or exactly ``output``), never into the
installed package.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]  # the fleetlm package root (== the repository root)


class BenchError(Exception):
    """A mistake in the benchmark's arguments: printed, exit status 2."""


def device_card(device: str) -> tuple[str, int]:
    """(what the device is, how many of them this process can see)."""
    if device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)", torch.cuda.device_count()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {name} ({os.cpu_count()} cores)", 1


def versions() -> dict[str, str | None]:
    import importlib.metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("fleetlm", "torch", "triton", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_commit(root: Path = REPO_ROOT) -> str:
    """``FLEETLM_GIT_COMMIT`` if set (a copied tree whose .git is not its own, as on the device
    machines), else ``git rev-parse HEAD`` of the source tree, else "unknown"."""
    if os.environ.get("FLEETLM_GIT_COMMIT"):
        return os.environ["FLEETLM_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def make_record(
    benchmark: str, config: dict[str, Any], figures: dict[str, Any], *, device: str, commit: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    card, num_devices = device_card(device)
    v = versions()
    return {
        "benchmark": benchmark,
        "card": card,
        "num_devices": num_devices,
        "torch": v.get("torch"),
        "triton": v.get("triton"),
        "versions": v,
        "commit": commit or git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "figures": figures,
        **extra,
    }


def default_results_dir() -> Path:
    """The current directory: records never go into the installed package's tree."""
    return Path.cwd()


def write_record(record: dict[str, Any], output: str | Path | None = None, results_dir: str | Path | None = None,
                 name: str | None = None) -> Path:
    """Write ``record`` as JSON to ``output``, or to ``<results_dir>/<name>-<UTC time>.json``."""
    if output is not None:
        path = Path(output)
    else:
        directory = Path(results_dir) if results_dir is not None else default_results_dir()
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        base = name or record["benchmark"]
        path = directory / f"{base}-{stamp}.json"
        n = 1
        while path.exists():
            n += 1
            path = directory / f"{base}-{stamp}-{n}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    return str(o)


__all__ = ["BenchError", "REPO_ROOT", "default_results_dir", "device_card", "git_commit", "make_record",
           "versions", "write_record"]
