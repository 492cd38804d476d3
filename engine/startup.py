"""The engine's start-up accounting: the warm-up, seconds per phase, what the start-up found and moved.

``startup_seconds``: the tokenizer (loaded while the workers start, so its
seconds overlap theirs), the workers' phases (start, weights, KV cache, CUDA
graphs), the warm-up. ``startup_details``: the compile cache
(warm or not) and the weights' bytes and GB/s. ``fleetlm build``, the
start-up metrics (``fleetlm_startup_seconds``) and the start-up benchmarks
read them from the engine.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from fleetlm.engine.warmup import WarmupReport, warm_up

logger = logging.getLogger("fleetlm.engine.llm_engine")  # the engine's own log line, as before


def tokenizer_and_workers(config, tokenizer=None, worker_group=None):
    """(tokenizer, worker group, the tokenizer's seconds): the tokenizer loads in a thread while
    the workers start and load their weights. The workers never need it, and its ~1.7 s
    (transformers' import, the vocabulary) would otherwise come first."""
    from fleetlm.workers.loader import model_tokenizer
    from fleetlm.workers.worker_group import create_worker_group

    def timed():
        t0 = time.perf_counter()
        return model_tokenizer(config.model), time.perf_counter() - t0

    with ThreadPoolExecutor(1, thread_name_prefix="fleetlm-tokenizer") as pool:
        loading = pool.submit(timed) if tokenizer is None else None
        workers = worker_group or create_worker_group(config)
        try:
            tokenizer, seconds = (tokenizer, 0.0) if loading is None else loading.result()
        except BaseException:
            if worker_group is None:
                workers.shutdown()  # Ray actors too: nothing this start made outlives it
            raise
    return tokenizer, workers, seconds


def start_up(engine, tokenizer_s: float) -> tuple[dict[str, float], WarmupReport | None, dict]:
    """Warm ``engine`` up when its config asks; returns (startup_seconds, warmup_report, startup_details)."""
    seconds = {"tokenizer": tokenizer_s, **engine.workers.startup_seconds}
    report = None
    cache = engine.workers.compile_cache  # None for Ray workers: each logs its own
    if engine.config.warmup:
        report = warm_up(engine)
        seconds["warmup"] = report.seconds
        if cache is not None and report.finished:
            cache.mark_warm(report.seconds)
    nbytes, load_s = engine.workers.weights_bytes, seconds.get("load_weights")
    weights = {"bytes": nbytes, "seconds": load_s, "gbps": nbytes / load_s / 1e9} if nbytes and load_s else None
    details = {"compile_cache": cache.to_dict() if cache is not None else None, "weights": weights}
    logger.info("engine up: %s%s", ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()),
                f"; compile cache {cache.dir} ({cache.entries_at_start} entries at start, "
                f"{'warm' if cache.warm else 'cold'})" if cache else "")
    return seconds, report, details
