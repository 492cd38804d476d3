"""The workers of one replica, seen by the engine as one thing that runs steps."""

from __future__ import annotations

from fleetlm.engine.config import EngineConfig
from fleetlm.engine.scheduler import SchedulerOutput
from fleetlm.workers.model_runner import ModelRunnerOutput, PendingOutput
from fleetlm.workers.worker import Worker


class LocalWorkerGroup:
    """A single worker in the engine's own process (TP = PP = 1): no Ray, no copies."""

    def __init__(self, config: EngineConfig) -> None:
        self.worker = Worker(config)
        self.load_seconds = self.worker.load_model()
        self.num_blocks = self.worker.num_available_blocks()
        if self.num_blocks < 1:
            raise RuntimeError("not enough memory for a single KV cache block; lower max_num_seqs or free memory")
        self.worker.init_kv_cache(self.num_blocks)
        if config.use_cuda_graphs:
            self.worker.capture_cuda_graphs()

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute(out)

    def launch(self, out: SchedulerOutput) -> PendingOutput:
        """Queue the step on the device; ``.result()`` waits for its ``ModelRunnerOutput``."""
        return self.worker.launch(out)

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        self.worker = None


def create_worker_group(config: EngineConfig):
    if config.parallel.world_size == 1:
        return LocalWorkerGroup(config)
    from fleetlm.workers.ray_group import RayWorkerGroup

    return RayWorkerGroup(config)
