"""Tensor and pipeline parallelism over Ray worker actors (CPU, gloo, float32).

Each rank is a Ray actor; tokens must equal the single-device engine's,
greedy, for 8 prompts x 32 tokens. Also: two replicas side by side on one
node, a replica inside a placement group reserved for it (as in Ray Serve),
a PP=2 replica spread over two emulated nodes (custom resource "fake_gpu"
standing for GPUs), a worker killed mid-generation, a worker that hangs, and
placement that cannot be satisfied. Budget: ~5 minutes on 2 idle cores.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

import ray

from fleetlm import LLM, SamplingParams  # noqa: E402
from fleetlm.engine.args import EngineArgs  # noqa: E402
from fleetlm.parallel.placement import PlacementError, PlacementSpec  # noqa: E402

pytestmark = pytest.mark.timeout(600)

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
    "Once upon a time",
    "The quick brown fox",
    "In 1492,",
    "Water boils at",
]
TINY_PROMPTS = [[(7 * i + 3 * j) % 500 + 3 for j in range(5 + 3 * i)] for i in range(8)]
# Small KV budgets: every worker of a 6-rank replica allocates its own cache.
SMOL = dict(model="smollm2-135m-instruct", device="cpu", dtype="float32", max_model_len=256, cpu_kv_cache_bytes=32 << 20)
TINY = dict(model="tiny-llama-8h4kv", load_format="dummy", device="cpu", dtype="float32", max_model_len=2048, cpu_kv_cache_bytes=16 << 20)


@pytest.fixture(scope="module")
def _ray_module():
    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_local(_ray_module):
    """The module's local Ray session (re-started if a multi-node test replaced it)."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield


def _tokens(llm: LLM, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


def _generate_and_close(prompts, **kw) -> tuple[list[list[int]], object]:
    llm = LLM(**kw)
    try:
        return _tokens(llm, prompts), llm.engine.workers
    finally:
        llm.engine.shutdown()


@pytest.fixture(scope="module")
def smol_reference() -> list[list[int]]:
    tokens, _ = _generate_and_close(PROMPTS, **SMOL)
    assert all(len(t) == 32 for t in tokens)
    return tokens


@pytest.fixture(scope="module")
def tiny_reference() -> list[list[int]]:
    tokens, _ = _generate_and_close(TINY_PROMPTS, **TINY)
    return tokens


def _assert_layout(group, tp: int, pp: int, collectives: str = "shared memory") -> None:
    assert [(i.rank, i.tp_rank, i.pp_rank) for i in group.infos] == [
        (p * tp + t, t, p) for p in range(pp) for t in range(tp)
    ]
    assert len({i.pid for i in group.infos}) == tp * pp  # one process per rank
    # CPU ranks of one host: TP collectives through shared memory unless turned off.
    assert group.tp_collectives == [collectives if tp > 1 else "none"]


# -- same tokens as one device ------------------------------------------------------------
@pytest.mark.parametrize("tp,pp", [(3, 1), (1, 2), (3, 2)], ids=["tp3", "pp2", "tp3xpp2"])
def test_embedded_model_matches_single_device(ray_local, smol_reference, tp, pp):
    # 9 query heads, 3 KV heads: TP=3 gives each rank 3 query heads and 1 KV head.
    tokens, group = _generate_and_close(PROMPTS, tensor_parallel_size=tp, pipeline_parallel_size=pp, **SMOL)
    _assert_layout(group, tp, pp)
    assert tokens == smol_reference


@pytest.mark.parametrize("tp,backend", [(3, None), (1, "ray")], ids=["tp3", "tp1-ray"])
def test_steps_launched_ahead_over_the_ring_match_single_device(ray_local, smol_reference, tp, backend):
    """Asynchronous scheduling through Ray workers: steps go over the shared-memory ring, the
    engine sends step N + 1 before N's tokens are back, TP ranks share the sampled ids."""
    llm = LLM(tensor_parallel_size=tp, distributed_executor_backend=backend, async_scheduling=True, **SMOL)
    try:
        group = llm.engine.workers
        assert group.steps is not None  # every worker on this node: steps by shared memory
        assert _tokens(llm, PROMPTS) == smol_reference
        assert llm.engine.num_steps_ahead > 0
        # Every worker has mapped the rings: their names are gone from /dev/shm (a killed replica leaks none).
        assert not group.steps.named and not group.results.named
        assert not any(os.path.exists(f"/dev/shm/{r.shm.name}") for r in (group.steps, group.results))
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("tp,pp,gloo", [(4, 1, False), (2, 2, False), (2, 2, True)],
                         ids=["tp4", "tp2xpp2", "tp2xpp2-gloo"])  # TP=2: two replicas below
def test_dummy_model_matches_single_device(ray_local, tiny_reference, tp, pp, gloo):
    # 8 query heads, 4 KV heads: at TP=4 one KV head per rank, ...
    tokens, group = _generate_and_close(TINY_PROMPTS, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                        disable_custom_all_reduce=gloo, **TINY)
    _assert_layout(group, tp, pp, "gloo" if gloo else "shared memory")
    assert tokens == tiny_reference


def test_kv_heads_replicated_beyond_their_count(ray_local, tiny_reference):
    # ... and at TP=8 each of the 4 KV heads lives on 2 ranks.
    from fleetlm.engine.llm_engine import LLMEngine
    from fleetlm.workers.ray_group import RayWorkerGroup

    config = EngineArgs(tensor_parallel_size=8, **TINY).create_engine_config()
    group = RayWorkerGroup(config)
    try:
        engine = LLMEngine(config, worker_group=group)
        assert _run_engine(engine, TINY_PROMPTS[:4]) == tiny_reference[:4]
    finally:
        group.shutdown()


def _run_engine(engine, prompts) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, GREEDY)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[f"r{i}"] for i in range(len(prompts))]


def test_two_tp2_replicas_on_one_node_do_not_collide(ray_local, tiny_reference):
    # TP=2, twice at once. Each replica's rank 0 binds its rendezvous port when it opens it: no
    # fixed port, so both come up and run interleaved steps side by side.
    a = LLM(tensor_parallel_size=2, **TINY)
    b = LLM(tensor_parallel_size=2, **TINY)
    try:
        _assert_layout(a.engine.workers, 2, 1)
        assert _tokens(a, TINY_PROMPTS[:4]) == tiny_reference[:4]
        assert _tokens(b, TINY_PROMPTS[4:]) == tiny_reference[4:]
    finally:
        a.engine.shutdown()
        b.engine.shutdown()


def test_inside_a_placement_group_workers_use_its_bundles(ray_local, tiny_reference):
    """As in a Ray Serve replica: the engine's actor sits in bundle 0 of a group
    that also reserved its workers' bundles; the workers go there, no second group."""
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0.5)
    class Replica:  # self-contained: the test module is not importable in a Ray worker
        def run(self, prompts, kwargs, params):
            from fleetlm import LLM

            llm = LLM(tensor_parallel_size=2, **kwargs)
            try:
                group = llm.engine.workers
                tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
                return tokens, [i.bundle_index for i in group.infos], group.pg.id.hex()
            finally:
                llm.engine.shutdown()

    pg = placement_group([{"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 0.5}], strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=60)
        replica = Replica.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0, placement_group_capture_child_tasks=True)
        ).remote()
        tokens, bundles, pg_hex = ray.get(replica.run.remote(TINY_PROMPTS[:3], TINY, GREEDY), timeout=300)
        assert tokens == tiny_reference[:3]
        assert pg_hex == pg.id.hex() and bundles == [1, 1]  # bundle 0's CPU is the replica's
        # No other group was created for the workers.
        assert [k for k, v in placement_group_table().items() if v["state"] != "REMOVED"] == [pg.id.hex()]
        ray.kill(replica)
    finally:
        remove_placement_group(pg)


# -- failures -------------------------------------------------------------------------------
def test_killed_worker_fails_every_request_and_nothing_hangs(ray_local):
    from fleetlm.engine.async_engine import AsyncEngine
    from fleetlm.workers.ray_group import WorkerGroupError

    engine = AsyncEngine.from_engine_args(EngineArgs(tensor_parallel_size=2, pipeline_parallel_size=2, **TINY))
    group = engine.engine.workers
    long = SamplingParams(temperature=0.0, max_tokens=1500, ignore_eos=True)

    async def scenario():
        started = asyncio.Event()
        outcomes: dict[str, tuple[str, float]] = {}

        async def consume(i: int) -> None:
            try:
                async for out in engine.generate(TINY_PROMPTS[i], long, f"req-{i}"):
                    if len(out.outputs[0].token_ids) >= 2:
                        started.set()
                outcomes[f"req-{i}"] = ("finished", time.monotonic())
            except Exception as e:  # noqa: BLE001 - the point of the test
                outcomes[f"req-{i}"] = (type(e).__name__, time.monotonic())

        tasks = [asyncio.create_task(consume(i)) for i in range(6)]
        await asyncio.wait_for(started.wait(), 60)
        await asyncio.sleep(0.2)
        ray.kill(group.workers[3], no_restart=True)  # last stage, TP rank 1
        killed_at = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        return outcomes, killed_at

    try:
        outcomes, killed_at = asyncio.run(scenario())
        assert sorted(outcomes) == [f"req-{i}" for i in range(6)]
        assert {kind for kind, _ in outcomes.values()} == {"EngineDeadError"}
        assert all(t - killed_at < 30 for _, t in outcomes.values())
        assert not group.healthy
        with pytest.raises(WorkerGroupError, match="died"):
            group.check_health()
        with pytest.raises(Exception):
            engine.check_health()
    finally:
        t0 = time.monotonic()
        asyncio.run(engine.shutdown())
        assert time.monotonic() - t0 < 30


def _wait_until_dead(actor, within_s: float = 30.0) -> None:
    """ray.kill is asynchronous: a call sent right after it may still be answered."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the killed actor still answers after {within_s:g} s")


def test_health_check_sees_a_dead_idle_worker(ray_local):
    from fleetlm.workers.ray_group import WorkerGroupError

    llm = LLM(tensor_parallel_size=2, **TINY)
    group = llm.engine.workers
    try:
        group.check_health()
        ray.kill(group.workers[1], no_restart=True)
        t0 = time.monotonic()
        _wait_until_dead(group.workers[1])
        with pytest.raises(WorkerGroupError, match=r"rank 1 \(tp 1, pp 0\)"):
            group.check_health()
        # The next step fails at once, it does not wait for the dead rank.
        with pytest.raises(WorkerGroupError):
            llm.generate(TINY_PROMPTS[:2], GREEDY)
        assert time.monotonic() - t0 < 30
    finally:
        llm.engine.shutdown()


def test_hung_worker_times_out_instead_of_hanging(ray_local):
    """A worker that stops answering (a stuck collective, a frozen process): the
    step fails after step_timeout_s, and the other ranks' collectives time out too."""
    import os
    import signal

    from fleetlm.engine.llm_engine import LLMEngine
    from fleetlm.workers.ray_group import RayWorkerGroup, WorkerGroupError

    config = EngineArgs(tensor_parallel_size=2, **TINY).create_engine_config()
    group = RayWorkerGroup(config, step_timeout_s=5.0)
    try:
        engine = LLMEngine(config, worker_group=group)
        assert _run_engine(engine, TINY_PROMPTS[:1])  # healthy first
        os.kill(group.infos[1].pid, signal.SIGSTOP)  # the actor process this test started
        engine.add_request("stuck", TINY_PROMPTS[1], GREEDY)
        t0 = time.monotonic()
        with pytest.raises(WorkerGroupError):
            engine.step()
        assert time.monotonic() - t0 < 20
        assert not group.healthy
        with pytest.raises(WorkerGroupError, match="failed earlier"):
            engine.step()
    finally:
        os.kill(group.infos[1].pid, signal.SIGCONT)
        group.shutdown()


def test_more_devices_than_the_cluster_has_fails_fast(ray_local):
    from fleetlm.workers.ray_group import RayWorkerGroup, WorkerGroupError

    config = EngineArgs(tensor_parallel_size=2, pipeline_parallel_size=2, **TINY).create_engine_config()
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match=r"= 4 workers need 4 fake_gpu but the cluster has 0 fake_gpu"):
        RayWorkerGroup(config, PlacementSpec(resource="fake_gpu"))
    with pytest.raises(PlacementError, match=r"need 400 CPU but the cluster has 2 CPU"):
        RayWorkerGroup(config, PlacementSpec(resource="CPU", per_worker=100))
    # Without the check (autoscaling clusters) the wait for the reservation is bounded instead.
    with pytest.raises(WorkerGroupError, match=r"could not reserve \{'fake_gpu': 4.0\}.* within 2 s"):
        RayWorkerGroup(config, PlacementSpec(resource="fake_gpu", fail_fast=False, timeout_s=2))
    assert time.monotonic() - t0 < 15
    # Nothing stays reserved.
    from ray.util.placement_group import placement_group_table

    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())


# -- several nodes ----------------------------------------------------------------------------
def test_pipeline_stages_on_different_nodes(_ray_module, tiny_reference, monkeypatch):
    """Two emulated nodes with 2 'GPUs' each: a TP=2 x PP=2 replica needs both,
    one stage per node (a stage's TP ranks share a node)."""
    from ray.cluster_utils import Cluster

    from fleetlm.workers import worker_group
    from fleetlm.workers.ray_group import RayWorkerGroup

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"fake_gpu": 2}, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, resources={"fake_gpu": 2})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        spec = PlacementSpec(resource="fake_gpu")
        monkeypatch.setattr(worker_group, "create_worker_group", lambda config: RayWorkerGroup(config, spec))
        tokens, group = _generate_and_close(TINY_PROMPTS, tensor_parallel_size=2, pipeline_parallel_size=2, **TINY)
        nodes = group.worker_node_ids
        assert nodes[0] == nodes[1] and nodes[2] == nodes[3]  # a stage's TP ranks share a node
        assert nodes[0] != nodes[2]  # the stages do not
        assert {n for n in nodes} == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert tokens == tiny_reference
    finally:
        ray.shutdown()
        cluster.shutdown()
