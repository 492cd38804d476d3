"""The workers of a TP x PP replica as Ray actors, seen by the engine as one thing that runs steps.

One actor per device owns its shard of the weights and of the KV cache
(``workers/worker_actor.py``); the actors of a stage all-reduce among
themselves and stages pass (hidden, residual) to the next over
torch.distributed (NCCL on GPU, gloo on CPU; see ``fleetlm.parallel``).
Ray places, starts and watches the actors; the steps do not go through it.

The control plane, per step:

- engine -> workers: the step, encoded once (``workers/step_codec.py``:
  block tables as what changed since the workers last saw them; new
  requests' prompts and ``SamplingParams`` once), written once into a
  shared-memory ring (``workers/shm_ring.py``) that every worker reads. A
  decode step of 64 requests is about 2 KiB, of 256 requests about 8 KiB,
  whatever their context length. This needs every worker on the engine's
  node; a group with a worker elsewhere (pipeline stages on other nodes)
  sends the same bytes as one Ray call per worker instead.
- sampling worker (last stage, TP rank 0) -> engine: the step's
  ``ModelRunnerOutput`` (a request id and its accepted token ids per
  sampling request, plus logprobs when asked), through a second ring with
  the engine as its one reader (or as that worker's Ray call's result).

With one pipeline stage the workers launch each step without waiting for
the device, as the engine's own process does, so the engine may schedule
and send step N + 1 while N runs (asynchronous scheduling): TP ranks other
than 0 get the sampled ids of step N from rank 0 over the TP group (a tiny
broadcast on the device), for the placeholders of N + 1. Inside each worker
decode steps replay CUDA graphs with the TP all-reduces captured in them.

Failure: every wait on the workers is bounded (``step_timeout_s`` per step);
while the engine waits on a ring it asks Ray every few milliseconds whether
a worker's loop ended (an actor that died surfaces as ``RayActorError``), a
hung collective surfaces as a timeout (collectives also time out inside the
workers, so they unstick). Either marks the group failed: the step's
``result()`` raises ``WorkerGroupError`` (now and on every later call) and
``check_health`` raises, so the engine fails every in-flight request
instead of hanging.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import time
from collections import deque

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fleetlm.engine.config import EngineConfig
from fleetlm.engine.step import ModelRunnerOutput, PendingStep, SchedulerOutput
from fleetlm.parallel.placement import PlacementSpec
from fleetlm.workers.shm_ring import RingClosed, RingTimeout, ShmRing
from fleetlm.workers.ray_placement import reserve
from fleetlm.workers.step_codec import STOP, StepEncoder
from fleetlm.workers.worker_actor import StepError, WorkerActor, WorkerInfo

logger = logging.getLogger("fleetlm.ray_group")

# Above this an encoded step sent by Ray calls goes through the object store
# once instead of being inlined in every worker's call (Ray inlines up to 100 KiB).
_PUT_THRESHOLD_BYTES = 64 << 10


class RayPendingStep(PendingStep):
    """One launched step; ``result()`` waits for it (bounded), in launch order."""

    def __init__(self, group: RayWorkerGroup, index: int, held: SchedulerOutput | None = None) -> None:
        self.group, self.index = group, index
        self._output: ModelRunnerOutput | None = None
        self._held = held  # a grammar_later step not sent yet (Ray calls)

    def supply_grammar(self, grammar) -> None:
        """The bitmask of a step launched with ``grammar_later``: on the ring, a message of its
        own after the step; by Ray calls (each runs a whole step), the step itself, now."""
        if self._held is not None:
            self.group._send(dataclasses.replace(self._held, grammar=grammar, grammar_later=False))
            self._held = None
        else:
            self.group._write_step(self.group.encoder.encode_grammar(self.index, grammar))

    def result(self) -> ModelRunnerOutput:
        if self._output is None:
            self._output = self.group._result(self.index)
        return self._output


class WorkerGroupError(RuntimeError):
    """A worker of the replica died, failed or hung; the replica cannot run steps any more."""


class RayWorkerGroup:
    """TP x PP worker actors of one replica, in one placement group the replica owns.

    Same interface as ``LocalWorkerGroup`` (``workers/worker_group.py``).
    With one pipeline stage its launches are asynchronous to the host (the
    engine may launch the next step behind one in flight); with several,
    one micro-batch per stage may be in flight.
    """

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
        transport: str = "auto",
    ) -> None:
        pc = config.parallel
        self.config = config
        self.tp_size, self.pp_size = pc.tensor_parallel_size, pc.pipeline_parallel_size
        self.world_size = pc.world_size
        self.spec = placement or PlacementSpec.for_device(pc.device)
        self.step_timeout_s = step_timeout_s
        self.init_timeout_s = init_timeout_s
        self.health_timeout_s = health_timeout_s
        if transport not in ("auto", "ring", "ray"):
            raise ValueError(f"transport must be 'auto', 'ring' or 'ray', got {transport!r}")
        self.transport = transport
        self.workers: list = []
        self.infos: list[WorkerInfo] = []
        self.tp_collectives: list[str] = []
        self.pg: PlacementGroup | None = None
        self._owns_pg = False
        self._failure: str | None = None
        self._closed = False
        # The worker whose step result carries the tokens: last stage, TP rank 0.
        self.output_rank = (self.pp_size - 1) * self.tp_size
        self.pipeline_depth = self.pp_size
        self.supports_async = self.pp_size == 1
        self.encoder = StepEncoder()
        self.steps: ShmRing | None = None  # the rings, when every worker is on this node
        self.results: ShmRing | None = None
        self._loops: list = []  # each worker's ``serve`` call, while the rings are in use
        self._calls: deque = deque()  # Ray transport: each launched step's calls, oldest first
        self._launched = 0  # steps launched so far
        self._done: dict[int, ModelRunnerOutput] = {}  # results read ahead of their turn
        self._next_result = 0
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
        try:
            self.pg, self._owns_pg, plan = reserve(self.spec, self.tp_size, self.pp_size)
        except TimeoutError as e:
            raise WorkerGroupError(str(e)) from None
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
        # What carries each stage's TP collectives: "nccl", "gloo", "shared memory" (CPU) or "none".
        self.tp_collectives = sorted(set(self._gather(
            [w.init_distributed.remote(master, port, self.step_timeout_s) for w in self.workers],
            self.init_timeout_s,
            "process group setup",
        )))
        t1 = time.perf_counter()
        loaded = self._gather([w.load.remote() for w in self.workers], self.init_timeout_s, "weight loading")
        self.num_blocks = min(n for _, n in loaded)
        if self.num_blocks < 1:
            raise RuntimeError("not enough memory for a single KV cache block; lower max_num_seqs or free memory")
        t2 = time.perf_counter()
        graphs = self._gather([w.init_kv_cache.remote(self.num_blocks) for w in self.workers], self.init_timeout_s,
                              "KV cache")
        # Seconds per start-up phase (the engine adds its warm-up): the slowest worker's.
        self.startup_seconds = {"workers": t1 - t0, "load_weights": t2 - t1,
                                "kv_cache": time.perf_counter() - t2 - max(graphs)}
        if max(graphs):
            self.startup_seconds["cuda_graphs"] = max(graphs)
        self._open_rings()
        logger.info(
            "replica of %d workers (tp %d x pp %d) up in %.1f s on nodes %s, %d KV blocks; steps by %s; "
            "TP collectives by %s",
            self.world_size, self.tp_size, self.pp_size, time.perf_counter() - t0,
            sorted({i.node_id[:8] for i in self.infos}), self.num_blocks,
            "shared memory" if self.steps is not None else "Ray calls", " and ".join(self.tp_collectives),
        )

    def _open_rings(self) -> None:
        """Rings when every worker shares this process' node ("auto"); Ray calls otherwise."""
        here = ray.get_runtime_context().get_node_id()
        local = all(i.node_id == here for i in self.infos)
        if self.transport == "ray" or (self.transport == "auto" and not local):
            return
        if not local:
            raise WorkerGroupError("transport 'ring' needs every worker on the engine's node")
        self.steps = ShmRing.create(num_readers=self.world_size, num_slots=4, slot_bytes=1 << 20)
        self.results = ShmRing.create(num_readers=1, num_slots=4, slot_bytes=256 << 10, reader=0)
        self._loops = [
            w.serve.remote(self.steps.handle, self.results.handle if rank == self.output_rank else None, rank,
                           self.supports_async)
            for rank, w in enumerate(self.workers)
        ]

    # -- the step -----------------------------------------------------------------
    def launch(self, out: SchedulerOutput) -> RayPendingStep:
        """Send a step without waiting for it; ``.result()`` waits (bounded by ``step_timeout_s``).

        Each worker runs its steps in the order sent, so with pipeline
        parallelism several launched steps (over disjoint requests) overlap:
        stage 0 runs step k+1 while stage 1 runs step k.
        """
        self._raise_if_failed()
        self._launched += 1
        if out.grammar_later and self.steps is None:
            return RayPendingStep(self, self._launched - 1, held=out)
        self._send(out)
        return RayPendingStep(self, self._launched - 1)

    def _send(self, out: SchedulerOutput) -> None:
        payload = self.encoder.encode(out)
        if self.steps is not None:
            self._write_step(payload)
        else:
            arg = ray.put(payload) if len(payload) > _PUT_THRESHOLD_BYTES else payload
            self._calls.append([w.execute.remote(arg) for w in self.workers])

    def _write_step(self, payload: bytes) -> None:
        self._raise_if_failed()
        self._ring_io(lambda deadline: self.steps.write(payload, deadline, self._loop_ended), "sending a step")

    def _result(self, index: int) -> ModelRunnerOutput:
        """The result of launched step ``index``; results arrive in launch order."""
        self._raise_if_failed()
        while index not in self._done:
            if self.steps is not None:
                raw = self._ring_io(lambda deadline: self.results.read(deadline, self._loop_ended), "step")
                result = pickle.loads(raw)
                if isinstance(result, StepError):
                    msg = f"rank {result.rank} failed a step: {result.message}"
                    self._fail(msg)
                    raise WorkerGroupError(msg)
                if self.steps.named:  # a step went through every worker: each has mapped both rings
                    self.steps.forget_name()
                    self.results.forget_name()
            else:
                results = self._gather(self._calls.popleft(), self.step_timeout_s, "step")
                result = results[self.output_rank]
            self._done[self._next_result] = result or ModelRunnerOutput.empty()
            self._next_result += 1
        return self._done.pop(index)

    def _ring_io(self, op, what: str):
        """A ring operation bounded by ``step_timeout_s``, failing the group if a worker died or hung."""
        try:
            return op(time.monotonic() + self.step_timeout_s)
        except RingTimeout as e:
            msg = f"{what} did not finish within {self.step_timeout_s:g} s (a worker hung or a collective stalled)"
            self._fail(msg)
            raise WorkerGroupError(msg) from e
        except RingClosed:
            ended, _ = ray.wait(self._loops, num_returns=1, timeout=0)
            self._gather(ended, self.health_timeout_s, what)  # raises the worker's own error
            msg = f"a worker's step loop ended during {what}"
            self._fail(msg)
            raise WorkerGroupError(msg) from None

    def _loop_ended(self) -> bool:
        """Whether some worker's loop returned or raised (checked while waiting on a ring)."""
        ended, _ = ray.wait(self._loops, num_returns=1, timeout=0)
        return bool(ended)

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
    def add_lora(self, adapter) -> None:
        """Every worker reads the adapter into host memory (a worker that cannot says why; the group stays up)."""
        errors = self._gather([w.lora.remote("add_lora", adapter) for w in self.workers], self.init_timeout_s,
                              "adapter loading")
        if any(errors):
            raise ValueError(next(filter(None, errors)))

    def remove_lora(self, lora_int_id: int) -> None:
        self._gather([w.lora.remote("remove_lora", lora_int_id) for w in self.workers], self.step_timeout_s,
                     "adapter removal")

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
        if self.steps is not None:
            if self._failure is None:
                try:  # let the loops return (and detach) before their actors go
                    self.steps.write(STOP, time.monotonic() + 2.0, self._loop_ended)
                    ray.wait(self._loops, num_returns=len(self._loops), timeout=5.0)
                except (RingTimeout, RingClosed):
                    pass
            self.steps.close()
            self.results.close()
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
