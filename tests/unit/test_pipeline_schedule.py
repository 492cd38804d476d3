"""Scheduling with micro-batches in flight (pipeline parallelism): disjoint requests, no preempting in-flight ones."""

from fleetlm.engine.config import CacheConfig, SchedulerConfig
from fleetlm.engine.request import Request, RequestStatus
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.engine.scheduler import Scheduler


def one_token(sampled: dict[str, int]) -> dict[str, list[int]]:
    """A step's result without proposals: one accepted token per sampling request."""
    return {rid: [t] for rid, t in sampled.items()}


def _req(rid, n, max_tokens=8):
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True), 4)


def _scheduler(num_blocks=64, budget=64):
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=64), CacheConfig(block_size=4), num_blocks)


def test_second_micro_batch_takes_only_requests_not_in_flight():
    s = _scheduler()
    for rid in "ab":
        s.add_request(_req(rid, 5))
    first = s.schedule()
    assert [x.request_id for x in first.scheduled] == ["a", "b"]
    s.update_from_output(first, one_token({"a": 7, "b": 7}))
    s.add_request(_req("c", 3))
    # "a" is in flight in a second micro-batch; the next one may take b and c only.
    mb1 = s.schedule(exclude={"b"})
    assert [x.request_id for x in mb1.scheduled] == ["a", "c"]
    mb2 = s.schedule(exclude={"a", "c"})
    assert [x.request_id for x in mb2.scheduled] == ["b"]
    assert s.schedule(exclude={"a", "b", "c"}).is_empty


def test_preemption_skips_requests_in_flight():
    s = _scheduler(num_blocks=4, budget=64)  # 4 blocks of 4 tokens
    s.add_request(_req("a", 7))
    s.add_request(_req("b", 7))
    out = s.schedule()  # a: 2 blocks, b: 2 blocks, the pool is full
    assert [x.request_id for x in out.scheduled] == ["a", "b"]
    s.update_from_output(out, one_token({"a": 9, "b": 9}))
    out = s.schedule()  # position 7 still fits each request's 2nd block
    assert [x.request_id for x in out.scheduled] == ["a", "b"]
    s.update_from_output(out, one_token({"a": 9, "b": 9}))  # 9 tokens each: position 8 needs a 3rd block
    mb = s.schedule(exclude={"b"})  # b is in flight: a must not evict it, so a preempts itself
    assert mb.is_empty and mb.preempted_request_ids == ["a"]
    assert s.requests["b"].status == RequestStatus.RUNNING and s.requests["a"].status == RequestStatus.PREEMPTED
    s.blocks.check_invariants()


def test_results_of_an_aborted_in_flight_request_are_ignored():
    s = _scheduler()
    s.add_request(_req("a", 5))
    out = s.schedule()
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert s.update_from_output(out, one_token({"a": 3})) == []
    assert s.blocks.num_free_blocks == s.blocks.num_blocks
