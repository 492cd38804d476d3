"""Scheduler (engine/scheduler.py) driven by hand: schedule(), then update_from_output() with chosen tokens.

Block size 4 throughout; block ids, chunk sizes, queue orders and ref counts are exact.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from fleetlm.engine.block_manager import cdiv
from fleetlm.engine.config import CacheConfig, SchedulerConfig
from fleetlm.engine.request import Request, RequestStatus
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.engine.scheduler import Scheduler
from fleetlm.engine.step import NewRequest, SchedulerOutput


def one_token(sampled: dict[str, int]) -> dict[str, list[int]]:
    """A step's result without proposals: one accepted token per sampling request."""
    return {rid: [t] for rid, t in sampled.items()}

BS = 4
EOS = 2
TOK = 5  # an ordinary token: never EOS, never a stop token in these tests


def mksched(
    budget: int = 64,
    max_seqs: int = 16,
    max_len: int = 256,
    num_blocks: int = 64,
    caching: bool = True,
    cap: int = 0,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_batched_tokens=budget,
            max_num_seqs=max_seqs,
            max_model_len=max_len,
            long_prefill_token_threshold=cap,
        ),
        CacheConfig(block_size=BS, enable_prefix_caching=caching),
        num_blocks,
    )


def mkreq(rid: str, prompt: int | list[int], *, max_tokens: int = 16, base: int = 100, eos=(EOS,), **params) -> Request:
    tokens = list(range(base, base + prompt)) if isinstance(prompt, int) else list(prompt)
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens, **params), BS, eos_token_ids=eos)


def check(s: Scheduler, out: SchedulerOutput | None = None) -> None:
    """Scheduler-level invariants, on top of the block manager's.

    Progress advances at schedule time, so between schedule() and
    update_from_output() ``num_computed_tokens`` already counts the scheduled
    tokens and the tables cover them. ``out`` (the step in flight, if any)
    names the requests that may hold a pending token.
    """
    in_flight = {x.request_id for x in out.scheduled if x.sample} if out is not None else set()
    s.blocks.check_invariants()
    running = {r.request_id for r in s.running}
    waiting = {r.request_id for r in s.waiting}
    assert not running & waiting
    assert running | waiting == set(s.requests)
    assert len(s.running) + len(s.waiting) == len(s.requests)
    assert len(s.running) <= s.config.max_num_seqs
    for r in s.running:
        assert r.status == RequestStatus.RUNNING
        assert len(s.blocks.blocks_of(r.request_id)) == cdiv(r.num_computed_tokens, BS), r
        assert r.num_pending_tokens == (r.request_id in in_flight), r
        assert r.num_tokens == len(r.token_ids) + r.num_pending_tokens
    for r in s.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert r.num_computed_tokens == 0
        assert r.request_id not in s.blocks.req_blocks, f"{r} waits but holds blocks"


def step(s: Scheduler, tokens: dict[str, int] | None = None) -> SchedulerOutput:
    """One step: schedule, 'run' it (sampling TOK unless told otherwise), update."""
    tokens = tokens or {}
    out = s.schedule()
    check(s, out)
    assert out.num_batched_tokens <= s.config.max_num_batched_tokens
    sampled = {x.request_id: tokens.get(x.request_id, TOK) for x in out.scheduled if x.sample}
    s.update_from_output(out, one_token(sampled))
    check(s)
    return out


def chunks(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    """(request id, start_pos, num tokens, sample) per scheduled request, in order."""
    return [(x.request_id, x.start_pos, len(x.token_ids), x.sample) for x in out.scheduled]


def tables(out: SchedulerOutput) -> dict[str, list[int]]:
    return {x.request_id: x.block_table for x in out.scheduled}


def ids(queue) -> list[str]:
    return [r.request_id for r in queue]


# -- torch-free core ------------------------------------------------------------


def test_scheduler_and_block_manager_do_not_import_torch():
    code = (
        "import sys; import fleetlm.engine.scheduler, fleetlm.engine.block_manager, fleetlm.engine.block_hash; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- token budget, chunked prefill, ordering ---------------------------------------


def test_empty_scheduler_gives_empty_step():
    s = mksched()
    out = s.schedule()
    assert out.is_empty and out.num_batched_tokens == 0
    assert out.new_requests == [] and out.finished_request_ids == [] and out.preempted_request_ids == []


def test_chunked_prefill_respects_token_budget_exactly():
    s = mksched(budget=8)
    a = mkreq("a", 20)
    b = mkreq("b", 5, base=500)
    s.add_request(a)
    s.add_request(b)

    out = step(s)
    assert chunks(out) == [("a", 0, 8, False)]
    assert out.scheduled[0].token_ids == list(range(100, 108))
    assert tables(out) == {"a": [0, 1]}
    assert ids(s.waiting) == ["b"]

    first = out
    out = step(s)
    assert chunks(out) == [("a", 8, 8, False)]
    assert out.scheduled[0].token_ids == list(range(108, 116))
    assert first.scheduled[0].block_table == [0, 1]  # a step's tables are snapshots
    assert tables(out) == {"a": [0, 1, 2, 3]}

    out = step(s, {"a": 40})
    assert chunks(out) == [("a", 16, 4, True), ("b", 0, 4, False)]
    assert out.scheduled[1].token_ids == [500, 501, 502, 503]
    assert tables(out) == {"a": [0, 1, 2, 3, 4], "b": [5]}
    assert a.output_token_ids == [40] and b.output_token_ids == []

    out = step(s, {"a": 41, "b": 50})
    assert chunks(out) == [("a", 20, 1, True), ("b", 4, 1, True)]
    assert [x.token_ids for x in out.scheduled] == [[40], [504]]
    assert tables(out) == {"a": [0, 1, 2, 3, 4, 6], "b": [5, 7]}
    assert out.num_batched_tokens == 2

    out = step(s)
    assert chunks(out) == [("a", 21, 1, True), ("b", 5, 1, True)]
    assert [x.token_ids for x in out.scheduled] == [[41], [50]]
    assert a.output_token_ids == [40, 41, TOK] and b.output_token_ids == [50, TOK]


def test_decodes_go_before_new_prefills():
    s = mksched(budget=8)
    s.add_request(mkreq("a", 3))
    assert chunks(step(s)) == [("a", 0, 3, True)]
    s.add_request(mkreq("b", 20, base=300))
    s.add_request(mkreq("c", 2, base=600))
    out = step(s)
    assert chunks(out) == [("a", 3, 1, True), ("b", 0, 7, False)]
    assert ids(s.waiting) == ["c"]
    out = step(s)
    assert chunks(out) == [("a", 4, 1, True), ("b", 7, 7, False)]
    out = step(s)
    assert chunks(out) == [("a", 5, 1, True), ("b", 14, 6, True), ("c", 0, 1, False)]


def test_long_prefill_threshold_caps_one_request_per_step():
    s = mksched(budget=16, cap=6)
    s.add_request(mkreq("a", 14))
    s.add_request(mkreq("b", 3, base=300))
    assert chunks(step(s)) == [("a", 0, 6, False), ("b", 0, 3, True)]
    assert chunks(step(s)) == [("a", 6, 6, False), ("b", 3, 1, True)]
    assert chunks(step(s)) == [("a", 12, 2, True), ("b", 4, 1, True)]


def test_max_num_seqs_is_respected():
    s = mksched(max_seqs=2)
    s.add_request(mkreq("a", 3, max_tokens=1))
    s.add_request(mkreq("b", 3, base=200))
    s.add_request(mkreq("c", 3, base=300))
    out = step(s)
    assert chunks(out) == [("a", 0, 3, True), ("b", 0, 3, True)]
    assert ids(s.waiting) == ["c"]
    # a finished (max_tokens=1), so c takes its seat.
    out = step(s)
    assert chunks(out) == [("b", 3, 1, True), ("c", 0, 3, True)]
    assert out.finished_request_ids == ["a"]


def test_fcfs_a_request_that_does_not_fit_blocks_those_behind_it():
    s = mksched(num_blocks=4)
    s.add_request(mkreq("a", 9, max_tokens=3))  # 3 blocks
    assert tables(step(s)) == {"a": [0, 1, 2]}
    s.add_request(mkreq("b", 5, max_tokens=3, base=300))  # needs 2 blocks, 1 free
    s.add_request(mkreq("c", 3, max_tokens=1, base=600))  # would fit in the free block
    out = step(s)
    assert chunks(out) == [("a", 9, 1, True)]
    assert out.new_requests == []
    assert ids(s.waiting) == ["b", "c"]
    assert s.blocks.num_free_blocks == 1
    # a finishes (3 tokens): b then c are admitted, in order.
    out = step(s)
    assert chunks(out) == [("a", 10, 1, True)]
    assert is_gone(s, "a")
    out = step(s)
    assert chunks(out) == [("b", 0, 5, True), ("c", 0, 3, True)]
    assert [n.request_id for n in out.new_requests] == ["b", "c"]


def is_gone(s: Scheduler, rid: str) -> bool:
    return rid not in s.requests and rid not in s.blocks.req_blocks


# -- preemption -------------------------------------------------------------------


def test_preemption_takes_last_admitted_and_admits_nothing_that_step():
    s = mksched(num_blocks=4)
    a = mkreq("a", 8, max_tokens=2)
    b = mkreq("b", 7, max_tokens=8, base=300)
    s.add_request(a)
    s.add_request(b)
    out = step(s, {"a": 10, "b": 20})
    assert tables(out) == {"a": [0, 1], "b": [2, 3]}
    assert s.blocks.num_free_blocks == 0
    c = mkreq("c", 3, max_tokens=1, base=600)
    s.add_request(c)

    # a's decode needs a 3rd block: b (admitted last) is preempted, c is not admitted.
    out = s.schedule()
    check(s, out)
    assert chunks(out) == [("a", 8, 1, True)]
    assert out.preempted_request_ids == ["b"]
    assert out.new_requests == []
    assert tables(out) == {"a": [0, 1, 3]}  # b's uncached block 3 was reused first
    assert b.status == RequestStatus.PREEMPTED
    assert b.num_computed_tokens == 0 and b.num_preemptions == 1 and s.num_preemptions == 1
    assert s.blocks.blocks_of("b") == []
    assert ids(s.waiting) == ["b", "c"]
    assert ids(s.running) == ["a"]
    # b's full prompt block (2) stays cached in the free queue.
    assert list(s.blocks.free) == [2]
    assert s.blocks.cached == {a.block_hashes[0]: 0, a.block_hashes[1]: 1, b.block_hashes[0]: 2}
    s.update_from_output(out, one_token({"a": 11}))
    check(s)
    assert a.status == RequestStatus.FINISHED_LENGTH

    # b resumes: hits its cached block 2, recomputes the rest (including its generated token).
    queried, hit = s.blocks.queried_tokens, s.blocks.hit_tokens
    out = s.schedule()
    check(s, out)
    assert out.finished_request_ids == ["a"]
    assert chunks(out) == [("b", 4, 4, True), ("c", 0, 3, True)]
    assert out.scheduled[0].token_ids == [304, 305, 306, 20]
    assert tables(out) == {"b": [2, 3], "c": [1]}  # c evicts a's tail block 1, not its head block 0
    assert [n.request_id for n in out.new_requests] == ["c"]  # b is not re-sent
    assert out.preempted_request_ids == []
    assert b.num_computed_tokens == 8  # the 4-token hit plus the 4 scheduled (progress advances at schedule time)
    assert b.num_pending_tokens == 1
    assert b.num_cached_tokens == 0  # first admission had no hit
    assert (s.blocks.queried_tokens - queried, s.blocks.hit_tokens - hit) == (8 + 3, 4)
    assert s.blocks.ref_cnt == [0, 1, 1, 1]
    s.update_from_output(out, one_token({"b": 21, "c": 30}))
    check(s)
    assert b.output_token_ids == [20, 21]


def test_several_victims_are_preempted_newest_first_and_requeued_in_admission_order():
    s = mksched(budget=20, cap=12, num_blocks=5)
    a = mkreq("a", 19, max_tokens=1)
    s.add_request(a)
    s.add_request(mkreq("b", 4, max_tokens=2, base=300))
    s.add_request(mkreq("c", 4, max_tokens=2, base=400))
    out = step(s)
    assert chunks(out) == [("a", 0, 12, False), ("b", 0, 4, True), ("c", 0, 4, True)]
    assert tables(out) == {"a": [0, 1, 2], "b": [3], "c": [4]}
    s.add_request(mkreq("d", 1, max_tokens=1, base=900))
    # a's last 7 prompt tokens need 2 more blocks: c goes (1 block is not enough), then b.
    out = s.schedule()
    check(s, out)
    assert out.preempted_request_ids == ["c", "b"]
    assert chunks(out) == [("a", 12, 7, True)]
    assert tables(out) == {"a": [0, 1, 2, 4, 3]}  # c's block freed earlier: evicted first
    assert ids(s.waiting) == ["b", "c", "d"]
    assert [r.num_preemptions for r in s.waiting] == [1, 1, 0]
    assert s.num_preemptions == 2


def test_running_request_preempts_itself_when_it_is_the_last_admitted():
    s = mksched(num_blocks=4)
    a = mkreq("a", 6, max_tokens=8)
    b = mkreq("b", 8, max_tokens=4, base=300)
    s.add_request(a)
    s.add_request(b)
    assert tables(step(s)) == {"a": [0, 1], "b": [2, 3]}
    s.add_request(mkreq("c", 1, max_tokens=1, base=900))
    out = s.schedule()
    check(s, out)
    # a's decode fits in its 2nd block; b needs a 3rd: b is the victim itself.
    assert chunks(out) == [("a", 6, 1, True)]
    assert out.preempted_request_ids == ["b"]
    assert ids(s.waiting) == ["b", "c"]
    assert list(s.blocks.free) == [3, 2]  # b's blocks, both cached: tail first
    assert s.blocks.block_hash[2] == b.block_hashes[0]
    assert s.blocks.block_hash[3] == b.block_hashes[1]


def test_resumed_request_with_prefix_caching_off_recomputes_everything():
    s = mksched(num_blocks=4, caching=False)
    a = mkreq("a", 8, max_tokens=2)
    b = mkreq("b", 7, max_tokens=8, base=300)
    s.add_request(a)
    s.add_request(b)
    step(s, {"b": 20})
    out = step(s)
    assert out.preempted_request_ids == ["b"]
    out = step(s)
    assert chunks(out) == [("b", 0, 8, True)]
    assert out.scheduled[0].token_ids == [300, 301, 302, 303, 304, 305, 306, 20]
    assert tables(out) == {"b": [0, 1]}  # all blocks uncached: reused in table order


# -- finishing, aborts, worker messages ----------------------------------------------


def test_new_requests_sent_exactly_once_and_finished_ids_reported_once():
    s = mksched(budget=4, num_blocks=4)
    a = mkreq("a", 6, max_tokens=2)
    s.add_request(a)
    sent: list[str] = []
    finished: list[str] = []
    for _ in range(6):
        out = step(s)
        sent += [n.request_id for n in out.new_requests]
        finished += out.finished_request_ids
        for n in out.new_requests:
            assert isinstance(n, NewRequest) and n.prompt_token_ids == a.prompt_token_ids and n.params is a.params
    assert sent == ["a"]
    assert finished == ["a"]
    assert a.status == RequestStatus.FINISHED_LENGTH
    assert s.blocks.ref_cnt == [0, 0, 0, 0]


def test_abort_waiting_request_returns_nothing_to_workers():
    s = mksched()
    s.add_request(mkreq("a", 5))
    r = s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert r is not None and r.status == RequestStatus.FINISHED_ABORTED and r.is_finished
    assert r.status.finish_reason == "abort"
    assert s.finish_request("a", RequestStatus.FINISHED_ABORTED) is None  # idempotent
    out = s.schedule()
    assert out.is_empty and out.finished_request_ids == [] and out.new_requests == []
    check(s)


def test_abort_running_request_frees_every_block_once():
    s = mksched(num_blocks=8)
    a = mkreq("a", 9)
    s.add_request(a)
    step(s)
    assert s.blocks.blocks_of("a") == [0, 1, 2]
    b = mkreq("b", 8, base=100)  # shares a's first block (and its second is cached too)
    s.add_request(b)
    step(s)
    assert s.blocks.blocks_of("b") == [0, 3]
    assert s.blocks.ref_cnt[:4] == [2, 1, 1, 1]
    assert s.finish_request("a", RequestStatus.FINISHED_ABORTED) is a
    check(s)
    assert s.blocks.ref_cnt[:4] == [1, 0, 0, 1]
    assert s.finish_request("a", RequestStatus.FINISHED_ABORTED) is None
    assert s.blocks.ref_cnt[:4] == [1, 0, 0, 1]
    check(s)
    out = s.schedule()
    assert out.finished_request_ids == ["a"]
    assert chunks(out) == [("b", 8, 1, True)]
    # b's step is still out (never updated here): schedule around it, as pipeline parallelism does.
    assert s.schedule(exclude={"b"}).finished_request_ids == []
    assert ids(s.running) == ["b"] and a.status == RequestStatus.FINISHED_ABORTED


def test_abort_preempted_request():
    s = mksched(num_blocks=4)
    s.add_request(mkreq("a", 8, max_tokens=8))
    s.add_request(mkreq("b", 7, max_tokens=8, base=300))
    step(s)
    out = step(s)
    assert out.preempted_request_ids == ["b"]
    b = s.finish_request("b", RequestStatus.FINISHED_ABORTED)
    assert b.status == RequestStatus.FINISHED_ABORTED
    check(s)
    assert ids(s.waiting) == []
    assert s.blocks.blocks_of("b") == []
    assert s.finish_request("b", RequestStatus.FINISHED_ABORTED) is None
    out = s.schedule()
    assert out.finished_request_ids == ["b"]  # the workers knew b
    assert sum(s.blocks.ref_cnt) == len(s.blocks.blocks_of("a")) == 3


def test_abort_while_step_runs_is_skipped_by_update():
    s = mksched()
    a = mkreq("a", 5)
    b = mkreq("b", 5, base=300)
    s.add_request(a)
    s.add_request(b)
    out = s.schedule()
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    results = s.update_from_output(out, one_token({"a": 7, "b": 8}))
    check(s)
    assert [(r.request_id, t) for r, t in results] == [("b", [8])]
    # Progress was advanced when the step was scheduled; the sampled token is discarded.
    assert a.output_token_ids == [] and a.num_computed_tokens == 5 and a.num_pending_tokens == 1
    assert s.schedule().finished_request_ids == ["a"]


def test_update_returns_token_only_for_sampling_requests():
    s = mksched(budget=6)
    s.add_request(mkreq("a", 3))
    s.add_request(mkreq("b", 9, base=300))
    out = s.schedule()
    assert chunks(out) == [("a", 0, 3, True), ("b", 0, 3, False)]
    res = s.update_from_output(out, one_token({"a": 9}))
    assert [(r.request_id, t) for r, t in res] == [("a", [9]), ("b", [])]
    assert s.requests["b"].num_computed_tokens == 3


# -- admission checks --------------------------------------------------------------


def test_rejects_prompt_plus_max_tokens_over_max_model_len():
    s = mksched(max_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        s.add_request(mkreq("a", 20, max_tokens=13))
    s.add_request(mkreq("b", 20, max_tokens=12))  # exactly max_model_len: fine
    assert "a" not in s.requests and ids(s.waiting) == ["b"]


def test_rejects_request_needing_more_blocks_than_exist():
    s = mksched(num_blocks=3)
    with pytest.raises(ValueError, match="blocks"):
        s.add_request(mkreq("a", 10, max_tokens=4))  # 13 K/V slots (not the last sampled token): 4 blocks > 3
    assert s.requests == {} and len(s.waiting) == 0


def test_rejects_duplicate_request_id():
    s = mksched()
    s.add_request(mkreq("a", 3))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(mkreq("a", 4))
    assert len(s.waiting) == 1


def test_request_that_fits_exactly_is_accepted_and_runs():
    """prompt + max_tokens tokens need K/V for all but the last sampled token.

    8-token prompt, max_tokens=1: the step that computes the 8 prompt tokens
    samples the only output token and the request ends; 2 blocks of 4 hold it.
    """
    s = mksched(num_blocks=2)
    try:
        s.add_request(mkreq("a", 8, max_tokens=1))
    except ValueError as e:
        pytest.fail(
            "BUG (Scheduler.check_fits off by one): a request needing 8 K/V slots (prompt 8 + "
            f"max_tokens 1, the last sampled token is never computed) fits 2 blocks of 4 but was rejected: {e}"
        )
    out = step(s)
    assert chunks(out) == [("a", 0, 8, True)]
    assert "a" not in s.requests


def test_prefix_cache_stats_count_each_admission_once():
    s = mksched(num_blocks=4)
    a = mkreq("a", 10, max_tokens=2)  # holds blocks 0, 1, 2 for its whole life
    c = mkreq("c", list(range(100, 104)) + list(range(500, 505)), max_tokens=2)  # a's first block + 5: 3 blocks
    s.add_request(a)
    s.add_request(c)
    out = step(s)
    assert chunks(out) == [("a", 0, 10, True)]  # c is looked up, does not fit, waits
    out = step(s)
    assert chunks(out) == [("a", 10, 1, True)]  # c hits block 0 now, still does not fit
    assert a.status == LEN
    out = step(s)
    assert chunks(out) == [("c", 4, 5, True)]
    assert tables(out) == {"c": [0, 2, 3]}  # a's cached block 1 survives
    assert c.num_cached_tokens == 4
    # Admitted once each: a (10 queried, 0 hit), c (9 queried, 4 hit).
    assert (s.blocks.queried_tokens, s.blocks.hit_tokens) == (10 + 9, 4), (
        "BUG: prefix-cache stats counted for lookups of a request that was not admitted "
        "(get_computed_blocks records them before allocate_slots fails; every blocked step re-counts): "
        f"got queried={s.blocks.queried_tokens} hit={s.blocks.hit_tokens}"
    )


# -- n > 1: siblings share the leader's prompt blocks ---------------------------------


def test_siblings_wait_for_leader_prompt_then_hit_its_blocks():
    s = mksched()
    leader = mkreq("r#0", 9)
    s1 = mkreq("r#1", 9)
    s2 = mkreq("r#2", 9)
    other = mkreq("x", 3, base=700)
    s.add_request(leader)
    s.add_request(s1, leader)
    s.add_request(s2, leader)
    s.add_request(other)
    out = step(s)
    # Siblings are held back (without blocking "x" behind them).
    assert chunks(out) == [("r#0", 0, 9, True), ("x", 0, 3, True)]
    assert ids(s.waiting) == ["r#1", "r#2"]
    assert tables(out) == {"r#0": [0, 1, 2], "x": [3]}
    out = step(s)
    assert chunks(out) == [("r#0", 9, 1, True), ("x", 3, 1, True), ("r#1", 8, 1, True), ("r#2", 8, 1, True)]
    assert tables(out) == {"r#0": [0, 1, 2], "x": [3], "r#1": [0, 1, 4], "r#2": [0, 1, 5]}
    assert s.blocks.ref_cnt[:6] == [3, 3, 1, 1, 1, 1]
    assert s1.num_cached_tokens == s2.num_cached_tokens == 8
    assert [n.request_id for n in out.new_requests] == ["r#1", "r#2"]


def test_siblings_wait_through_chunked_prefill_of_leader():
    s = mksched(budget=6)
    leader = mkreq("r#0", 13)
    sib = mkreq("r#1", 13)
    s.add_request(leader)
    s.add_request(sib, leader)
    assert chunks(step(s)) == [("r#0", 0, 6, False)]
    assert chunks(step(s)) == [("r#0", 6, 6, False)]
    assert chunks(step(s)) == [("r#0", 12, 1, True)]
    out = step(s)
    assert chunks(out) == [("r#0", 13, 1, True), ("r#1", 12, 1, True)]
    assert tables(out)["r#1"][:3] == tables(out)["r#0"][:3]


def test_siblings_proceed_when_leader_is_aborted():
    s = mksched(budget=4)
    leader = mkreq("r#0", 9)
    sib = mkreq("r#1", 9)
    s.add_request(leader)
    s.add_request(sib, leader)
    step(s)
    s.finish_request("r#0", RequestStatus.FINISHED_ABORTED)
    out = step(s)
    assert chunks(out) == [("r#1", 4, 4, False)]  # a's first block was computed and cached
    assert out.finished_request_ids == ["r#0"]


def test_siblings_not_held_back_without_prefix_caching():
    s = mksched(caching=False)
    leader = mkreq("r#0", 9)
    s.add_request(leader)
    s.add_request(mkreq("r#1", 9), leader)
    out = step(s)
    assert chunks(out) == [("r#0", 0, 9, True), ("r#1", 0, 9, True)]
    assert tables(out) == {"r#0": [0, 1, 2], "r#1": [3, 4, 5]}


# -- stop conditions through update_from_output ---------------------------------------


def run_tokens(s: Scheduler, req: Request, tokens: list[int]) -> list[RequestStatus]:
    """Feed ``tokens`` one per step; return the status after each."""
    statuses = []
    for t in tokens:
        out = s.schedule()
        assert [x.request_id for x in out.scheduled] == [req.request_id]
        s.update_from_output(out, one_token({req.request_id: t}))
        check(s)
        statuses.append(req.status)
    return statuses


R, STOP, LEN = RequestStatus.RUNNING, RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH


def test_stop_on_eos():
    s = mksched()
    r = mkreq("a", 3)
    s.add_request(r)
    assert run_tokens(s, r, [7, EOS]) == [R, STOP]
    assert r.output_token_ids == [7, EOS] and r.stop_reason is None
    assert r.status.finish_reason == "stop"
    assert s.requests == {} and s.running == [] and sum(s.blocks.ref_cnt) == 0


def test_eos_ignored_before_min_tokens():
    s = mksched()
    r = mkreq("a", 3, min_tokens=3)
    s.add_request(r)
    assert run_tokens(s, r, [EOS, EOS, EOS]) == [R, R, STOP]
    assert r.output_token_ids == [EOS, EOS, EOS]


def test_ignore_eos_runs_to_max_tokens():
    s = mksched()
    r = mkreq("a", 3, max_tokens=3, ignore_eos=True)
    s.add_request(r)
    assert run_tokens(s, r, [EOS, EOS, EOS]) == [R, R, LEN]
    assert r.status.finish_reason == "length"


def test_stop_token_ids_with_reason_and_min_tokens():
    s = mksched()
    r = mkreq("a", 3, stop_token_ids=[9, 11], min_tokens=2)
    s.add_request(r)
    assert run_tokens(s, r, [11, 7, 9]) == [R, R, STOP]
    assert r.stop_reason == 9
    # stop_token_ids still apply with ignore_eos.
    r2 = mkreq("b", 3, stop_token_ids=[9], ignore_eos=True)
    s.add_request(r2)
    assert run_tokens(s, r2, [EOS, 9]) == [R, STOP]
    assert r2.stop_reason == 9


def test_stop_on_max_tokens():
    s = mksched()
    r = mkreq("a", 3, max_tokens=4)
    s.add_request(r)
    assert run_tokens(s, r, [7, 7, 7, 7]) == [R, R, R, LEN]
    assert r.num_output_tokens == 4 and r.stop_reason is None


def test_stop_at_max_model_len():
    s = mksched(max_len=8)
    r = mkreq("a", 5, max_tokens=3)
    s.add_request(r)
    assert run_tokens(s, r, [7, 7, 7]) == [R, R, LEN]
    assert r.num_tokens == 8
    # The length stop is independent of max_tokens (check_fits keeps the two aligned in the scheduler).
    q = mkreq("q", 5, max_tokens=10)
    q.append_token(7)
    assert q.check_token_stop(max_model_len=7) is None
    q.append_token(7)
    assert q.check_token_stop(max_model_len=7) == LEN


def test_stop_takes_precedence_over_length_on_the_same_token():
    s = mksched()
    r = mkreq("a", 3, max_tokens=2, stop_token_ids=[9])
    s.add_request(r)
    assert run_tokens(s, r, [7, 9]) == [R, STOP]
    assert r.stop_reason == 9


def test_finished_request_keeps_its_blocks_cached_for_others():
    s = mksched(num_blocks=8)
    a = mkreq("a", 8, max_tokens=1)
    s.add_request(a)
    step(s)
    assert a.status == LEN
    assert s.blocks.ref_cnt == [0] * 8
    b = mkreq("b", 9, base=100)
    s.add_request(b)
    out = step(s)
    assert chunks(out) == [("b", 8, 1, True)]
    assert tables(out) == {"b": [0, 1, 2]}
    assert b.num_cached_tokens == 8


# -- randomized run against a simulated KV cache ---------------------------------------


class FakeKV:
    """Slots written by each step; checks that every request reads back its own tokens."""

    def __init__(self, num_blocks: int) -> None:
        self.slots = [[None] * BS for _ in range(num_blocks)]

    def run(self, s: Scheduler, out: SchedulerOutput) -> None:
        written: set[tuple[int, int]] = set()
        for x in out.scheduled:
            req = s.requests[x.request_id]
            table = x.block_table
            assert len(table) == cdiv(x.start_pos + len(x.token_ids), BS)
            assert x.token_ids == req.token_ids[x.start_pos : x.start_pos + len(x.token_ids)]
            # The attention of this step reads positions < start_pos from the cache.
            for p in range(x.start_pos):
                got = self.slots[table[p // BS]][p % BS]
                assert got == req.token_ids[p], f"{x.request_id}: position {p} reads {got}, expected {req.token_ids[p]}"
            for j, t in enumerate(x.token_ids):
                p = x.start_pos + j
                b = table[p // BS]
                assert s.blocks.ref_cnt[b] == 1, f"{x.request_id} writes into shared block {b}"
                assert (b, p % BS) not in written, f"slot {(b, p % BS)} written twice in one step"
                written.add((b, p % BS))
                self.slots[b][p % BS] = t


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("caching", [True, False])
def test_randomized_steps_keep_invariants_and_kv_contents(seed, caching):
    import random

    rng = random.Random(seed)
    num_blocks = 10
    s = mksched(budget=rng.choice([6, 10, 16]), max_seqs=rng.choice([4, 8]), max_len=36,
                num_blocks=num_blocks, caching=caching, cap=rng.choice([0, 5]))
    kv = FakeKV(num_blocks)
    prefixes = [[rng.randrange(10, 20) for _ in range(rng.randrange(0, 10))] for _ in range(3)]
    added = finished = 0
    reported: list[str] = []
    sent: list[str] = []
    for t in range(150):
        if t < 100 and rng.random() < 0.4:
            n = rng.choice([1, 1, 1, 2, 3])
            prompt = rng.choice(prefixes) + [rng.randrange(10, 20) for _ in range(rng.randrange(1, 8))]
            max_tokens = rng.randrange(1, 36 - len(prompt) + 1)
            leader = None
            for i in range(n):
                r = mkreq(f"r{added}#{i}", prompt, max_tokens=max_tokens, stop_token_ids=[3])
                s.add_request(r, leader)
                leader = leader or r
            added += 1
        if s.requests and rng.random() < 0.05:
            victim = rng.choice(sorted(s.requests))
            s.finish_request(victim, RequestStatus.FINISHED_ABORTED)
            check(s)
        out = s.schedule()
        check(s, out)
        assert out.num_batched_tokens <= s.config.max_num_batched_tokens
        assert len({x.request_id for x in out.scheduled}) == len(out.scheduled)
        reported += out.finished_request_ids
        sent += [n.request_id for n in out.new_requests]
        kv.run(s, out)
        sampled = {x.request_id: rng.choice([EOS, 3] + [7, 8, 9, 11] * 4) for x in out.scheduled if x.sample}
        s.update_from_output(out, one_token(sampled))
        check(s)
    # Drain: everything left finishes (no starvation, no leak).
    for _ in range(3000):
        if not s.requests:
            break
        out = s.schedule()
        check(s, out)
        reported += out.finished_request_ids
        sent += [n.request_id for n in out.new_requests]
        kv.run(s, out)
        s.update_from_output(out, one_token({x.request_id: 7 for x in out.scheduled if x.sample}))
        check(s)
    assert s.requests == {}
    reported += s.schedule().finished_request_ids
    assert sum(s.blocks.ref_cnt) == 0 and s.blocks.num_free_blocks == num_blocks
    assert len(sent) == len(set(sent)), "a request was sent to the workers twice"
    assert sorted(reported) == sorted(sent), "every request the workers saw is reported finished exactly once"
