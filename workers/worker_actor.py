"""A ``Worker`` inside a Ray actor: process-group setup, loading, and the step loop.

Ray places the actor, starts it, and tells the replica when it dies; the
steps themselves do not go through Ray. On the engine's node a worker runs
``serve``: a loop that reads each step from the shared-memory ring the
engine writes (``workers/shm_ring.py``), decodes it (``workers/step_codec.py``),
runs its share, and, on the worker that samples (the last stage's TP rank
0), writes the step's ``ModelRunnerOutput`` to the result ring. A worker on
another node gets each step as a Ray call (``execute``), with the same
encoding.

When the worker can run steps asynchronously (one pipeline stage), the loop
launches a step and goes back to the ring at once; a completer thread waits
for each launched step's tokens, in order, and writes them back. So the
device runs step N while the host of every worker already prepares N + 1,
as in the engine's own process.

``ping`` answers in its own concurrency group, so health checks work while a
step (or the loop) runs.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import threading
import time
from dataclasses import dataclass

import ray
import torch

from fleetlm.engine.config import EngineConfig
from fleetlm.engine.step import ModelRunnerOutput
from fleetlm.parallel.distributed import backend_for, create_store, init_distributed, split_rank
from fleetlm.workers.shm_ring import RingClosed, ShmRing
from fleetlm.workers.step_codec import STOP, LateGrammar, StepDecoder
from fleetlm.workers.worker import Worker

logger = logging.getLogger("fleetlm.worker_actor")

IDLE_FOREVER_S = 365 * 24 * 3600.0  # a worker waits for steps as long as its replica lives


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    tp_rank: int
    pp_rank: int
    node_id: str
    node_ip: str
    bundle_index: int
    pid: int


@dataclass
class StepError:
    """What the sampling worker writes back instead of a result when its step raised."""

    rank: int
    message: str


@ray.remote(max_restarts=0, max_task_retries=0, concurrency_groups={"control": 1, "loop": 1})
class WorkerActor:
    def __init__(self, config: EngineConfig, rank: int, bundle_index: int, cpu_threads: int | None) -> None:
        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
        self.config = config
        self.rank = rank
        self.bundle_index = bundle_index
        self.store = None
        self.worker: Worker | None = None
        self.ctx = None
        self.decoder = StepDecoder()

    def info(self) -> WorkerInfo:
        ctx = ray.get_runtime_context()
        tp_rank, pp_rank = split_rank(self.rank, self.config.parallel.tensor_parallel_size)
        return WorkerInfo(self.rank, tp_rank, pp_rank, ctx.get_node_id(), ray.util.get_node_ip_address(),
                          self.bundle_index, os.getpid())

    def create_store(self, timeout_s: float) -> int:
        """Rank 0: open the rendezvous store on a free port; returns the port."""
        self.store = create_store(timeout_s)
        return self.store.port

    def init_distributed(self, master_addr: str, master_port: int, timeout_s: float) -> str:
        """Join the replica's process groups; returns what carries this stage's TP collectives."""
        pc = self.config.parallel
        self.ctx = init_distributed(rank=self.rank, tp_size=pc.tensor_parallel_size,
                                    pp_size=pc.pipeline_parallel_size, master_addr=master_addr,
                                    master_port=master_port, device=self._device(), timeout_s=timeout_s,
                                    store=self.store, shm_collectives=not pc.disable_custom_all_reduce)
        if pc.tensor_parallel_size == 1:
            return "none"
        return "shared memory" if self.ctx.tp_shm is not None else backend_for(self._device())

    def _device(self) -> str:
        # On CUDA, Ray gives the actor exactly one visible GPU.
        return "cuda:0" if self.config.parallel.device == "cuda" else "cpu"

    def load(self) -> tuple[float, int]:
        """Build the worker and load its shard; returns (seconds, KV blocks it can hold)."""
        self.worker = Worker(self.config, self.ctx, self._device())
        if self.worker.compile_cache is not None:
            logger.info("rank %d: compile cache %s (%d entries at start)", self.rank,
                        self.worker.compile_cache.dir, self.worker.compile_cache.entries_at_start)
        seconds = self.worker.load_model()
        return seconds, self.worker.num_available_blocks()

    def init_kv_cache(self, num_blocks: int) -> float:
        """Allocate the KV cache, then capture CUDA graphs where they apply; returns the capture's seconds."""
        self.worker.init_kv_cache(num_blocks)
        # One stage only: a later stage's input is the previous stage's hidden
        # states, which the decode graphs do not take. The TP collectives are
        # captured inside the graphs (every rank captures the same sizes in
        # the same order).
        if self.config.use_cuda_graphs and self.config.parallel.pipeline_parallel_size == 1:
            return self.worker.capture_cuda_graphs()
        return 0.0

    # -- steps ------------------------------------------------------------------------
    def execute(self, payload: bytes) -> ModelRunnerOutput | None:
        """One encoded step as a Ray call (workers off the engine's node)."""
        return self.worker.execute_stage(self.decoder.decode(payload))

    @ray.method(concurrency_group="loop")
    def serve(self, steps_handle, results_handle, reader: int, launch_ahead: bool) -> None:
        """Run every step the engine writes to the ring until it writes ``STOP``.

        ``results_handle``: the result ring, on the worker that samples (None
        on the others). ``launch_ahead``: launch each step without waiting for
        it (one pipeline stage), leaving the wait to the completer thread.
        """
        steps = ShmRing.attach(steps_handle, reader)
        results = ShmRing.attach(results_handle, None) if results_handle is not None else None
        completer = _Completer(results, self.rank) if results is not None and launch_ahead else None
        deferred = None  # a launched step whose sampling waits for its grammar (the next message)
        try:
            while True:
                payload = steps.read(time.monotonic() + IDLE_FOREVER_S,
                                     cancelled=(lambda: completer.failed) if completer else lambda: False)
                if payload == STOP:
                    return
                out = self.decoder.decode(payload)
                try:
                    if isinstance(out, LateGrammar):  # only the sampling worker has a step waiting for it
                        if deferred is not None:
                            deferred.supply_grammar(out.grammar)
                            completer.put(deferred)
                            deferred = None
                        continue
                    if launch_ahead:
                        pending = self.worker.launch(out)
                        if completer is not None:
                            if out.grammar_later:
                                deferred = pending
                            else:
                                completer.put(pending)
                        continue
                    result = self.worker.execute_stage(out)
                except Exception as e:
                    if results is not None:
                        _write(results, StepError(self.rank, f"{type(e).__name__}: {e}"))
                    raise
                if results is not None:
                    _write(results, result or ModelRunnerOutput.empty())
        except RingClosed:
            return  # the completer failed and wrote the error back
        finally:
            if completer is not None:
                completer.stop()
            steps.close()
            if results is not None:
                results.close()

    def lora(self, op: str, arg) -> str | None:
        """``add_lora`` / ``remove_lora`` on the worker's host cache (thread-safe: it runs beside
        the step loop); an error comes back as text, the adapter's fault, not the worker's."""
        try:
            getattr(self.worker, op)(arg)
        except Exception as e:  # noqa: BLE001 - reported to the caller, the replica stays up
            return f"{type(e).__name__}: {e}"
        return None

    @ray.method(concurrency_group="control")
    def ping(self) -> bool:
        return True


def _write(ring: ShmRing, obj) -> None:
    ring.write(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), time.monotonic() + IDLE_FOREVER_S)


class _Completer:
    """Waits for launched steps in launch order and writes their results to the ring."""

    _DONE = object()

    def __init__(self, ring: ShmRing, rank: int) -> None:
        self.ring, self.rank = ring, rank
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.failed = False
        self.thread = threading.Thread(target=self._run, name="fleetlm-completer", daemon=True)
        self.thread.start()

    def put(self, pending) -> None:
        self.queue.put(pending)

    def stop(self) -> None:
        self.queue.put(self._DONE)
        self.thread.join(timeout=60)

    def _run(self) -> None:
        while (pending := self.queue.get()) is not self._DONE:
            try:
                result = pending.result()
            except Exception as e:  # noqa: BLE001 - reported to the engine, which fails the group
                _write(self.ring, StepError(self.rank, f"{type(e).__name__}: {e}"))
                self.failed = True  # after the error is written: the engine reads it first
                return
            _write(self.ring, result)
