"""``fleetlm build``: fill the compile cache ahead of time, so that serving starts warm.

TensorRT-LLM's "build once" idea without a separate engine format: the
model's engine is started once exactly as a replica of ``fleetlm serve``
with the same flags would start it (the same engine arguments, hence the
same kernel variants and the same cache key), with the warm-up on, and then
stopped. Every kernel variant serving takes is then compiled into the
compile cache (``--compile-cache-dir``, default ``~/.cache/fleetlm/compile``
on GPU), and a later ``fleetlm serve`` of that model and those settings on
this machine, or on a node that mounts the directory, finds it warm
(``workers/compile_cache.py``). The start-up breakdown is printed.
"""

from __future__ import annotations

import time
from typing import Any

from fleetlm.cluster.replica import engine_args_kwargs
from fleetlm.cluster.serve_config import ModelDeploymentConfig, ServeAppConfig


def build(model: ModelDeploymentConfig, app: ServeAppConfig | None = None) -> dict[str, Any]:
    """Start and stop the engine of ``model`` with the warm-up on; what it did, per phase.

    Raises ValueError when no compile cache applies (nothing would persist).
    """
    from fleetlm.engine.args import EngineArgs
    from fleetlm.engine.llm_engine import LLMEngine

    app = app or ServeAppConfig()
    kwargs = {**engine_args_kwargs(model, app.max_n, app.max_logprobs), "warmup": True}
    config = EngineArgs.from_kwargs(**kwargs).create_engine_config()
    if config.compile_cache_dir is None:
        raise ValueError("no compile cache to fill on this device by default: give --compile-cache-dir")
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    try:
        seconds = time.perf_counter() - t0
        report = engine.warmup_report
        return {"model": model.name, "compile_cache_dir": config.compile_cache_dir, "seconds": seconds,
                "startup_seconds": dict(engine.startup_seconds), **engine.startup_details,
                "warmup_finished": bool(report and report.finished)}
    finally:
        engine.shutdown()


def describe(result: dict[str, Any]) -> str:
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in result["startup_seconds"].items())
    cache = result.get("compile_cache") or {}
    kernels = cache.get("entries")
    return (f"built {result['model']} in {result['seconds']:.1f} s ({phases}); compile cache "
            f"{cache.get('dir', result['compile_cache_dir'])}"
            + (f": {kernels} entries" if kernels is not None else "")
            + ("" if result["warmup_finished"] else " (the warm-up hit its time limit: the cache is partial)"))


__all__ = ["build", "describe"]
