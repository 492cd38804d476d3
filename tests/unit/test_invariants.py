"""Idle invariants (cluster/invariants.py) over a real Scheduler driven by hand: no torch, no Ray."""

from __future__ import annotations

from types import SimpleNamespace

from fleetlm.cluster.invariants import engine_invariants
from fleetlm.engine.config import CacheConfig, SchedulerConfig
from fleetlm.engine.request import Request, RequestStatus
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.engine.scheduler import Scheduler
from fleetlm.engine.snapshot import EngineSnapshot


def one_token(sampled: dict[str, int]) -> dict[str, list[int]]:
    """A step's result without proposals: one accepted token per sampling request."""
    return {rid: [t] for rid, t in sampled.items()}

BS = 4


def mkengine(num_blocks: int = 8) -> SimpleNamespace:
    """An engine-shaped object: a real scheduler, an inbox and streams, and the engine's snapshot."""
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=64),
                      CacheConfig(block_size=BS, enable_prefix_caching=True), num_blocks)
    eng = SimpleNamespace(engine=SimpleNamespace(scheduler=sched), _adds=[], _streams={})
    eng.snapshot = lambda: EngineSnapshot.take(sched, num_inbox=len(eng._adds), num_streams=len(eng._streams))
    return eng


def run_to_end(sched: Scheduler, rid: str, prompt: list[int], max_tokens: int) -> None:
    sched.add_request(Request(rid, prompt, SamplingParams(max_tokens=max_tokens), BS))
    while rid in sched.requests:
        out = sched.schedule()
        sched.update_from_output(out, one_token({s.request_id: 7 for s in out.scheduled if s.sample}))


def test_fresh_engine_is_idle_and_clean():
    r = engine_invariants(mkengine())
    assert r.idle and r.ok and r.violations == []
    assert (r.num_blocks, r.num_free_blocks, r.num_cached_free_blocks, r.num_referenced_blocks) == (8, 8, 0, 0)


def test_finished_requests_leave_only_unreferenced_cache():
    eng = mkengine()
    run_to_end(eng.engine.scheduler, "a", list(range(100, 109)), max_tokens=3)  # 9 + 3 tokens: 2 full blocks cached
    r = engine_invariants(eng)
    assert r.ok, r.violations
    assert (r.num_free_blocks, r.num_cached_free_blocks, r.num_referenced_blocks) == (8, 2, 0)


def test_running_request_is_not_idle_and_not_a_violation_of_blocks():
    eng = mkengine()
    sched = eng.engine.scheduler
    sched.add_request(Request("a", list(range(100, 106)), SamplingParams(max_tokens=4), BS))
    sched.schedule()
    r = engine_invariants(eng)
    assert not r.idle and not r.ok
    assert r.violations == ["not idle: num_running=1, num_scheduler_requests=1"]
    assert r.num_referenced_blocks == 2
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert engine_invariants(eng).ok


def test_inbox_and_streams_count_as_busy():
    eng = mkengine()
    eng._adds.append(object())
    eng._streams["x"] = object()
    r = engine_invariants(eng)
    assert r.violations == ["not idle: num_inbox=1, num_streams=1"]


def test_leaked_block_is_reported():
    eng = mkengine()
    bm = eng.engine.scheduler.blocks
    # A request that vanished from the scheduler without freeing its blocks.
    bm.allocate_slots(Request("ghost", [1, 2, 3, 4, 5], SamplingParams(max_tokens=1), BS), 5)
    r = engine_invariants(eng)
    assert r.idle and not r.ok
    assert r.violations == [
        "2 blocks still referenced with no request in flight: [0, 1]",
        "free pool holds 6 of 8 blocks",
        "block tables left for 1 requests: ['ghost']",
    ]


def test_broken_ref_count_is_reported():
    eng = mkengine()
    bm = eng.engine.scheduler.blocks
    del bm.free[3]  # out of the pool with ref_cnt 0: lost
    r = engine_invariants(eng)
    assert not r.ok
    assert r.violations[0] == "free pool holds 7 of 8 blocks"
    assert r.violations[1].startswith("block manager: block 3")
