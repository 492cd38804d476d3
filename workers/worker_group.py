"""The workers of one replica, seen by the engine as one thing that runs steps.

Every worker group has the same interface: ``num_blocks`` (KV blocks each
worker holds), ``startup_seconds`` (seconds per start-up phase),
``compile_cache`` (where an in-process worker's compiled kernels live),
``weights_bytes`` (what an in-process worker loaded onto its device),
``launch(out) -> PendingStep`` (``.result()`` waits for the step's
``ModelRunnerOutput``), ``add_lora(adapter)`` / ``remove_lora(id)``
(adapters in the workers' host memory), ``check_health()``, ``shutdown()``, and what
it can do, from which the engine picks its step mode once
(``engine/llm_engine.py``): ``supports_async`` (a launch returns before
the device finishes, so the next step may be launched behind it) and
``pipeline_depth`` (micro-batches that may be in flight at once).
"""

from __future__ import annotations

import time

from fleetlm.engine.config import EngineConfig
from fleetlm.engine.step import SchedulerOutput
from fleetlm.workers.pending import PendingOutput
from fleetlm.workers.worker import Worker


class LocalWorkerGroup:
    """A single worker in the engine's own process (TP = PP = 1): no Ray, no copies."""

    supports_async = True
    pipeline_depth = 1

    def __init__(self, config: EngineConfig) -> None:
        t0 = time.perf_counter()
        self.worker = Worker(config)
        self.startup_seconds = {"workers": time.perf_counter() - t0, "load_weights": self.worker.load_model()}
        t1 = time.perf_counter()
        self.num_blocks = self.worker.num_available_blocks()
        if self.num_blocks < 1:
            raise RuntimeError("not enough memory for a single KV cache block; lower max_num_seqs or free memory")
        self.worker.init_kv_cache(self.num_blocks)
        self.startup_seconds["kv_cache"] = time.perf_counter() - t1
        if config.use_cuda_graphs:
            self.startup_seconds["cuda_graphs"] = self.worker.capture_cuda_graphs()
        self.compile_cache = self.worker.compile_cache
        self.weights_bytes = self.worker.weights_bytes

    def launch(self, out: SchedulerOutput) -> PendingOutput:
        """Queue the step on the device; ``.result()`` waits for its ``ModelRunnerOutput``."""
        return self.worker.launch(out)

    def add_lora(self, adapter) -> None:
        self.worker.add_lora(adapter)

    def remove_lora(self, lora_int_id: int) -> None:
        self.worker.remove_lora(lora_int_id)

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        self.worker = None


def create_worker_group(config: EngineConfig):
    if config.parallel.distributed_executor_backend == "uni":
        return LocalWorkerGroup(config)
    from fleetlm.workers.ray_group import RayWorkerGroup

    return RayWorkerGroup(config)
