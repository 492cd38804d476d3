"""The workers of a TP x PP replica as Ray actors, seen by the engine as one thing that runs steps.

One actor per device owns its shard of the weights and of the KV cache
(``Worker``); the actors of a stage all-reduce among themselves and stages
pass (hidden, residual) to the next over torch.distributed (NCCL on GPU,
gloo on CPU; see ``fleetlm.parallel.distributed`` and ``.pipeline``). Ray
carries only control messages.

What crosses the actor boundary each step (pickled by Ray, inlined in the
task when under 100 KiB):

- engine -> every worker: the step's ``SchedulerOutput`` (W = tp x pp Ray
  calls). Size: about 60 bytes per scheduled request plus ~5 bytes per
  token id and per block id (each request's whole block table is resent
  every step), plus each NEW request's prompt and ``SamplingParams`` once.
  Measured pickles: a decode step of 8 requests at 64 context is 0.6 KiB,
  64 requests at 1024 context 15 KiB, 256 requests at 2048 context 155 KiB
  (block tables dominate; sending only new block ids would shrink it ~20x);
  a 2048-token prefill of a new request 13 KiB. Small steps are passed by
  value (inlined in each call's task spec, no object store); a step
  estimated above ``_PUT_THRESHOLD_BYTES`` is ``ray.put`` once and every
  worker reads the same object (Ray would otherwise store it once per call).
  Measured per-step Ray overhead, 6 workers on a loaded 2-core CPU box:
  5.9 ms (8 req), 9.3 ms (64 req), 31 ms (256 req, put); a Ray compiled
  graph (shared-memory channels) was slower there, 17 / 25 / 87 ms, its
  readers spin on the two cores the workers need.
- last stage's TP rank 0 -> engine: ``ModelRunnerOutput``: one request id
  and one token id per sampling request (+ k (id, logprob, rank) triples
  when logprobs are asked): ~30 bytes per request. Every other worker
  returns ``None``.

No tensor crosses Ray on the hot path: hidden states go stage to stage over
the collective backend, logits are gathered over the TP group, and only the
sampled ids come back. Only the last stage's TP rank 0 samples: the other
ranks of that stage hold the same gathered logits but their result would be
discarded, so they skip the sampler (``ModelRunner.launch`` checks
``ctx.tp_rank``). A rank's share of a step (receive, run, send on) is
``Worker.execute_stage``; the actor only adds the Ray plumbing.

Failure: every wait on the workers is bounded (``step_timeout_s`` per step);
an actor that died surfaces at once as ``RayActorError`` (``ray.get`` of a
list raises on the first failed element), a hung collective as a timeout
(collectives also time out inside the workers, so they unstick). Either
marks the group failed: a step's ``result()`` raises ``WorkerGroupError`` (now and on
every later call) and ``check_health`` raises, so the engine fails every
in-flight request instead of hanging.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fleetlm.engine.config import EngineConfig
from fleetlm.engine.step import ModelRunnerOutput, PendingStep, SchedulerOutput
from fleetlm.parallel.distributed import create_store, init_distributed, split_rank
from fleetlm.parallel.placement import PlacementSpec, assign_bundles, check_cluster_fits, stage_bundles
from fleetlm.workers.worker import Worker

logger = logging.getLogger("fleetlm.ray_group")


# Above this a step's SchedulerOutput goes through the object store once
# instead of being inlined in every worker's call (Ray inlines up to 100 KiB).
_PUT_THRESHOLD_BYTES = 64 << 10


def _estimate_bytes(out: SchedulerOutput) -> int:
    """Rough pickled size of a step (ints pickle to ~5 bytes each), without pickling it."""
    ints = sum(len(s.token_ids) + len(s.block_table) for s in out.scheduled)
    ints += sum(len(n.prompt_token_ids) for n in out.new_requests)
    return 64 * len(out.scheduled) + 5 * ints


class RayPendingStep(PendingStep):
    """The workers' calls of one step; the tokens come from the last stage's TP rank 0."""

    def __init__(self, group: RayWorkerGroup, refs: list) -> None:
        self.group, self.refs = group, refs
        self._output: ModelRunnerOutput | None = None

    def result(self) -> ModelRunnerOutput:
        if self._output is None:
            results = self.group._gather(self.refs, self.group.step_timeout_s, "step")
            self._output = results[self.group.output_rank] or ModelRunnerOutput.empty()
        return self._output


class WorkerGroupError(RuntimeError):
    """A worker of the replica died, failed or hung; the replica cannot run steps any more."""


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    tp_rank: int
    pp_rank: int
    node_id: str
    node_ip: str
    bundle_index: int
    pid: int


@ray.remote(max_restarts=0, max_task_retries=0, concurrency_groups={"control": 1})
class WorkerActor:
    """A ``Worker`` inside a Ray actor, plus the replica-level plumbing (process
    group, pipeline send/recv). ``ping`` runs in its own concurrency group so
    health checks are answered while a step is running."""

    def __init__(self, config: EngineConfig, rank: int, bundle_index: int, cpu_threads: int | None) -> None:
        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
        self.config = config
        self.rank = rank
        self.bundle_index = bundle_index
        self.store = None
        self.worker = None
        self.ctx = None

    def info(self) -> WorkerInfo:
        ctx = ray.get_runtime_context()
        tp_rank, pp_rank = split_rank(self.rank, self.config.parallel.tensor_parallel_size)
        return WorkerInfo(
            self.rank, tp_rank, pp_rank, ctx.get_node_id(), ray.util.get_node_ip_address(), self.bundle_index, os.getpid()
        )

    def create_store(self, timeout_s: float) -> int:
        """Rank 0: open the rendezvous store on a free port; returns the port."""
        self.store = create_store(timeout_s)
        return self.store.port

    def init_distributed(self, master_addr: str, master_port: int, timeout_s: float) -> None:
        pc = self.config.parallel
        self.ctx = init_distributed(
            rank=self.rank,
            tp_size=pc.tensor_parallel_size,
            pp_size=pc.pipeline_parallel_size,
            master_addr=master_addr,
            master_port=master_port,
            device=self._device(),
            timeout_s=timeout_s,
            store=self.store,
        )

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

    def init_kv_cache(self, num_blocks: int) -> None:
        self.worker.init_kv_cache(num_blocks)

    def execute_step(self, out: SchedulerOutput) -> ModelRunnerOutput | None:
        """Receive from the previous stage, run, send on; tokens from the last stage's TP rank 0 only."""
        return self.worker.execute_stage(out)

    @ray.method(concurrency_group="control")
    def ping(self) -> bool:
        return True


class RayWorkerGroup:
    """TP x PP worker actors of one replica, in one placement group the replica owns.

    Same interface as ``LocalWorkerGroup`` (``workers/worker_group.py``).
    Its launches are not asynchronous to the host (each returns once the
    calls are sent; the engine's async mode needs device-side placeholders
    the Ray path does not have yet); with pipeline stages, one micro-batch
    per stage may be in flight.
    """

    supports_async = False
    compile_cache = None  # each worker points its Triton at the cache itself and logs it
    weights_bytes = None  # each worker's own

    def __init__(
        self,
        config: EngineConfig,
        placement: PlacementSpec | None = None,
        *,
        step_timeout_s: float = 120.0,
        init_timeout_s: float = 600.0,
        health_timeout_s: float = 10.0,
    ) -> None:
        pc = config.parallel
        self.config = config
        self.tp_size, self.pp_size = pc.tensor_parallel_size, pc.pipeline_parallel_size
        self.world_size = pc.world_size
        self.spec = placement or PlacementSpec.for_device(pc.device)
        self.step_timeout_s = step_timeout_s
        self.init_timeout_s = init_timeout_s
        self.health_timeout_s = health_timeout_s
        self.workers: list = []
        self.infos: list[WorkerInfo] = []
        self.pg: PlacementGroup | None = None
        self._owns_pg = False
        self._failure: str | None = None
        self._closed = False
        # The worker whose step result carries the tokens: last stage, TP rank 0.
        self.output_rank = (self.pp_size - 1) * self.tp_size
        self.pipeline_depth = self.pp_size
        if not ray.is_initialized():
            ray.init()
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    # -- startup ------------------------------------------------------------------
    def _start(self) -> None:
        t0 = time.perf_counter()
        plan = self._reserve()
        cpu_threads = 1 if self.config.parallel.device != "cuda" else None
        self.workers = [
            WorkerActor.options(
                **self.spec.actor_options(),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=bundle, placement_group_capture_child_tasks=False
                ),
            ).remote(self.config, rank, bundle, cpu_threads)
            for rank, bundle in enumerate(plan)
        ]
        self.infos = self._gather([w.info.remote() for w in self.workers], self.init_timeout_s, "start")
        master = self.infos[0].node_ip
        port = self._gather([self.workers[0].create_store.remote(self.init_timeout_s)], self.init_timeout_s, "rendezvous")[0]
        self._gather(
            [w.init_distributed.remote(master, port, self.step_timeout_s) for w in self.workers],
            self.init_timeout_s,
            "process group setup",
        )
        t1 = time.perf_counter()
        loaded = self._gather([w.load.remote() for w in self.workers], self.init_timeout_s, "weight loading")
        self.num_blocks = min(n for _, n in loaded)
        if self.num_blocks < 1:
            raise RuntimeError("not enough memory for a single KV cache block; lower max_num_seqs or free memory")
        t2 = time.perf_counter()
        self._gather([w.init_kv_cache.remote(self.num_blocks) for w in self.workers], self.init_timeout_s, "KV cache")
        # Seconds per start-up phase (the engine adds its warm-up): the slowest worker's.
        self.startup_seconds = {"workers": t1 - t0, "load_weights": t2 - t1, "kv_cache": time.perf_counter() - t2}
        logger.info(
            "replica of %d workers (tp %d x pp %d) up in %.1f s on nodes %s, %d KV blocks",
            self.world_size, self.tp_size, self.pp_size, time.perf_counter() - t0,
            sorted({i.node_id[:8] for i in self.infos}), self.num_blocks,
        )

    def _reserve(self) -> list[int]:
        """Reserve (or borrow) the placement group; returns the bundle index of each rank."""
        current = get_current_placement_group()
        if current is not None:
            # Inside a Ray Serve replica (or any actor in a placement group):
            # the workers' devices are already reserved in this group.
            self.pg, self._owns_pg = current, False
            self._wait_ready()
            return self._plan_in_borrowed_group()
        if self.spec.fail_fast:
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            check_cluster_fits(self.spec, self.tp_size, self.pp_size, nodes)
        self.pg = placement_group(stage_bundles(self.spec, self.tp_size, self.pp_size), strategy=self.spec.strategy)
        self._owns_pg = True
        self._wait_ready()
        # Stage s -> bundle s: a bundle sits on one node, so a stage does too.
        return [stage for stage in range(self.pp_size) for _ in range(self.tp_size)]

    def _wait_ready(self) -> None:
        ready, _ = ray.wait([self.pg.ready()], timeout=self.spec.timeout_s)
        if not ready:
            need = {k: v * self.world_size for k, v in self.spec.worker_resources().items()}
            raise WorkerGroupError(
                f"could not reserve {need} for tp {self.tp_size} x pp {self.pp_size} workers within "
                f"{self.spec.timeout_s:g} s; available now: "
                f"{ {k: ray.available_resources().get(k, 0.0) for k in need} } (other replicas may hold them)"
            )

    def _plan_in_borrowed_group(self) -> list[int]:
        table = placement_group_table(self.pg)
        pg_hex = self.pg.id.hex()
        avail = ray.available_resources()
        specs = self.pg.bundle_specs
        # What is still free in each bundle (the replica actor itself may use one).
        free = [
            {k: avail.get(f"{k}_group_{i}_{pg_hex}", 0.0) for k in spec} for i, spec in enumerate(specs)
        ]
        nodes = [table["bundles_to_node_id"].get(i, "") for i in range(len(specs))]
        return assign_bundles(self.spec, self.tp_size, self.pp_size, free, nodes)

    # -- the step -----------------------------------------------------------------
    def launch(self, out: SchedulerOutput) -> RayPendingStep:
        """Start a step without waiting for it; ``.result()`` waits (bounded by ``step_timeout_s``).

        Each actor runs its steps in submission order, so with pipeline
        parallelism several launched steps (over disjoint requests) overlap:
        stage 0 runs step k+1 while stage 1 runs step k.
        """
        self._raise_if_failed()
        # One Ray call per worker (see the module docstring for sizes).
        arg = ray.put(out) if _estimate_bytes(out) > _PUT_THRESHOLD_BYTES else out
        return RayPendingStep(self, [w.execute_step.remote(arg) for w in self.workers])

    def _gather(self, refs: list, timeout_s: float, what: str) -> list:
        """``ray.get`` with a bound; any failure marks the group failed and raises ``WorkerGroupError``."""
        try:
            return ray.get(refs, timeout=timeout_s)
        except GetTimeoutError as e:
            msg = f"{what} did not finish within {timeout_s:g} s (a worker hung or a collective stalled)"
            self._fail(msg)
            raise WorkerGroupError(msg) from e
        except RayActorError as e:
            msg = f"a worker actor died during {what}: {self._describe_dead(e)}"
            self._fail(msg)
            raise WorkerGroupError(msg) from e
        except RayError as e:
            msg = f"a worker failed during {what}: {e}"
            self._fail(msg)
            raise WorkerGroupError(msg) from e

    def _describe_dead(self, e: RayActorError) -> str:
        actor_id = getattr(e, "actor_id", None)
        for w, info in zip(self.workers, self.infos):
            if actor_id is not None and w._actor_id.hex() == actor_id:
                return f"rank {info.rank} (tp {info.tp_rank}, pp {info.pp_rank}) on node {info.node_ip}"
        return str(e).splitlines()[0] if str(e) else type(e).__name__

    def _fail(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason
            logger.error("worker group failed: %s", reason)

    def _raise_if_failed(self) -> None:
        if self._closed:
            raise WorkerGroupError("worker group is shut down")
        if self._failure is not None:
            raise WorkerGroupError(f"worker group failed earlier: {self._failure}")

    # -- control --------------------------------------------------------------------
    def check_health(self) -> None:
        """Raise ``WorkerGroupError`` if a worker is dead or does not answer within ``health_timeout_s``."""
        self._raise_if_failed()
        self._gather([w.ping.remote() for w in self.workers], self.health_timeout_s, "health check")

    @property
    def healthy(self) -> bool:
        return self._failure is None and not self._closed

    @property
    def worker_node_ids(self) -> list[str]:
        """Node id of each global rank (pp_rank * tp_size + tp_rank)."""
        return [i.node_id for i in self.infos]

    def shutdown(self) -> None:
        """Kill the workers and release the placement group; idempotent."""
        if self._closed:
            return
        self._closed = True
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.workers = []
        if self.pg is not None and self._owns_pg:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001 - already removed (or Ray shut down)
                pass
        self.pg = None
