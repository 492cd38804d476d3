"""Asynchronous scheduling in the scheduler: pending tokens, placeholders, steps scheduled ahead.

The engine keeps one step in flight: it schedules step N+1 (``ahead=True``)
before step N's tokens are known, then updates N, then N+1. Block size 4;
exact block ids, token lists and counters. No torch.
"""

from __future__ import annotations

import random

import pytest

from fleetlm.engine.block_manager import cdiv
from fleetlm.engine.config import CacheConfig, SchedulerConfig
from fleetlm.engine.request import Request, RequestStatus
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.engine.scheduler import Scheduler
from fleetlm.engine.step import PLACEHOLDER, SchedulerOutput


def one_token(sampled: dict[str, int]) -> dict[str, list[int]]:
    """A step's result without proposals: one accepted token per sampling request."""
    return {rid: [t] for rid, t in sampled.items()}

BS = 4
EOS = 2


def mksched(budget=64, max_seqs=8, max_len=64, num_blocks=32, caching=True) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=max_len),
        CacheConfig(block_size=BS, enable_prefix_caching=caching),
        num_blocks,
    )


def mkreq(rid, prompt, *, max_tokens=16, base=100, **params) -> Request:
    tokens = list(range(base, base + prompt)) if isinstance(prompt, int) else list(prompt)
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens, **params), BS, eos_token_ids=(EOS,))


def view(out: SchedulerOutput) -> list[tuple[str, int, list[int], bool]]:
    return [(x.request_id, x.start_pos, x.token_ids, x.sample) for x in out.scheduled]


def test_step_ahead_decodes_a_placeholder_and_updates_replace_pending_tokens_in_order():
    s = mksched()
    a = mkreq("a", 6)
    s.add_request(a)
    n0 = s.schedule()
    assert view(n0) == [("a", 0, list(range(100, 106)), True)]
    assert (a.num_computed_tokens, a.num_pending_tokens, a.num_tokens, len(a.token_ids)) == (6, 1, 7, 6)
    n1 = s.schedule(ahead=True)
    assert view(n1) == [("a", 6, [PLACEHOLDER], True)]
    assert n1.step_id == n0.step_id + 1 and s.num_steps_in_flight == 2
    assert (a.num_computed_tokens, a.num_pending_tokens, a.num_tokens) == (7, 2, 8)
    assert s.blocks.blocks_of("a") == [0, 1]
    assert s.update_from_output(n0, one_token({"a": 7})) == [(a, [7])]
    assert a.output_token_ids == [7] and a.num_pending_tokens == 1
    assert s.update_from_output(n1, one_token({"a": 8})) == [(a, [8])]
    assert a.output_token_ids == [7, 8] and a.num_pending_tokens == 0 and a.num_tokens == 8
    assert s.num_steps_in_flight == 0
    # With N's token known, the next step carries it for real.
    assert view(s.schedule()) == [("a", 7, [8], True)]


def test_block_hashes_cover_only_real_tokens():
    s = mksched()
    a = mkreq("a", 7)  # the first sampled token completes block 1
    s.add_request(a)
    n0 = s.schedule()
    n1 = s.schedule(ahead=True)  # computes position 7 from a placeholder
    assert len(a.block_hashes) == 1  # the pending token's block has no hash yet
    s.update_from_output(n0, one_token({"a": 9}))
    assert len(a.block_hashes) == 2 and a.token_ids[4:8] == [104, 105, 106, 9]
    assert s.blocks.cached == {a.block_hashes[0]: 0}
    s.update_from_output(n1, one_token({"a": 10}))
    # Block 1 (computed by n1, position 7 from the placeholder) is cached once its tokens are real.
    assert s.blocks.cached == {a.block_hashes[0]: 0, a.block_hashes[1]: 1}


def test_pending_token_that_ends_the_request_on_length_is_not_scheduled_ahead():
    s = mksched(max_len=12)
    a = mkreq("a", 5, max_tokens=1)
    b = mkreq("b", 9, max_tokens=3, base=300)  # 9 + 3 = max_model_len
    s.add_request(a)
    s.add_request(b)
    n0 = s.schedule()
    assert a.finishes_on_length_with_pending(12) and not b.finishes_on_length_with_pending(12)
    n1 = s.schedule(ahead=True)
    assert view(n1) == [("b", 9, [PLACEHOLDER], True)]  # a's one token is all it gets
    s.update_from_output(n0, one_token({"a": 7, "b": 7}))
    assert a.status == RequestStatus.FINISHED_LENGTH and s.blocks.blocks_of("a") == []
    n2 = s.schedule(ahead=True)
    assert view(n2) == [("b", 10, [PLACEHOLDER], True)]
    assert b.num_tokens == 12 and b.num_pending_tokens == 2
    s.update_from_output(n1, one_token({"b": 8}))
    # b's pending third token ends it (max_tokens, and max_model_len): position 11 is never computed.
    assert b.finishes_on_length_with_pending(12)
    assert s.schedule(ahead=True).is_empty
    assert s.update_from_output(n2, one_token({"b": 9})) == [(b, [9])]
    assert b.status == RequestStatus.FINISHED_LENGTH and b.output_token_ids == [7, 8, 9]
    assert b.num_computed_tokens == 11


def test_penalties_make_the_step_ahead_come_back_empty_without_side_effects():
    s = mksched()
    a = mkreq("a", 5)
    p = mkreq("p", 5, base=300, repetition_penalty=1.2)
    s.add_request(a)
    s.add_request(p)
    n0 = s.schedule()
    s.finish_request("gone", RequestStatus.FINISHED_ABORTED)  # unknown id: no-op
    before = (a.num_computed_tokens, a.num_pending_tokens, p.num_computed_tokens, p.num_pending_tokens)
    ahead = s.schedule(ahead=True)
    assert ahead.is_empty and ahead.preempted_request_ids == []
    assert (a.num_computed_tokens, a.num_pending_tokens, p.num_computed_tokens, p.num_pending_tokens) == before
    assert s.num_steps_in_flight == 1
    s.update_from_output(n0, one_token({"a": 7, "p": 8}))
    # Synchronous fallback: with N processed nothing is pending, p is scheduled normally.
    assert view(s.schedule()) == [("a", 5, [7], True), ("p", 5, [8], True)]


def test_penalty_request_without_pending_token_does_not_block_the_step_ahead():
    s = mksched(budget=6)
    a = mkreq("a", 3)
    p = mkreq("p", 9, base=300, presence_penalty=0.5)
    s.add_request(a)
    s.add_request(p)
    n0 = s.schedule()
    assert view(n0) == [("a", 0, [100, 101, 102], True), ("p", 0, [300, 301, 302], False)]
    n1 = s.schedule(ahead=True)  # p's prefill chunk has no pending token: its next chunk may go ahead
    assert view(n1) == [("a", 3, [PLACEHOLDER], True), ("p", 3, [303, 304, 305, 306, 307], False)]
    s.update_from_output(n0, one_token({"a": 7}))
    s.update_from_output(n1, one_token({"a": 8}))
    assert p.num_computed_tokens == 8 and p.num_pending_tokens == 0


def test_step_ahead_never_preempts():
    s = mksched(num_blocks=4)
    a = mkreq("a", 8, max_tokens=4)
    b = mkreq("b", 8, max_tokens=4, base=300)
    s.add_request(a)
    s.add_request(b)
    n0 = s.schedule()
    assert s.blocks.num_free_blocks == 0
    ahead = s.schedule(ahead=True)  # a's placeholder at position 8 needs a third block
    assert ahead.is_empty and ahead.preempted_request_ids == []
    assert a.status == b.status == RequestStatus.RUNNING and s.num_preemptions == 0
    s.update_from_output(n0, one_token({"a": 7, "b": 7}))
    out = s.schedule()  # synchronous again: now b is preempted for a
    assert view(out) == [("a", 8, [7], True)] and out.preempted_request_ids == ["b"]
    assert b.num_computed_tokens == 0 and b.num_pending_tokens == 0 and b.output_token_ids == [7]


def test_scheduling_a_pending_token_outside_an_ahead_step_is_a_bug():
    s = mksched(num_blocks=4)
    a = mkreq("a", 8, max_tokens=4)
    b = mkreq("b", 8, max_tokens=4, base=300)
    s.add_request(a)
    s.add_request(b)
    s.schedule()
    with pytest.raises(AssertionError, match="pending token outside an ahead step"):
        s.schedule()


def test_abort_while_two_steps_are_in_flight_discards_both_and_frees_blocks_at_once():
    s = mksched(num_blocks=8)
    a = mkreq("a", 6)
    b = mkreq("b", 6, base=300)
    s.add_request(a)
    s.add_request(b)
    n0 = s.schedule()
    n1 = s.schedule(ahead=True)
    assert s.blocks.blocks_of("a") == [0, 1]
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert s.blocks.blocks_of("a") == [] and s.blocks.ref_cnt[:2] == [0, 0]
    # No block of a was hashed yet (hashes are registered at update): both go to the front of the pool.
    assert list(s.blocks.free) == [0, 1, 4, 5, 6, 7]
    assert s.update_from_output(n0, one_token({"a": 7, "b": 7})) == [(b, [7])]
    assert s.update_from_output(n1, one_token({"a": 8, "b": 8})) == [(b, [8])]
    assert a.output_token_ids == [] and b.output_token_ids == [7, 8]
    out = s.schedule()
    assert out.finished_request_ids == ["a"]
    assert s.schedule(exclude={"b"}).finished_request_ids == []


def test_request_id_reused_after_abort_never_gets_the_old_requests_tokens():
    s = mksched()
    old = mkreq("a", 5)
    s.add_request(old)
    n0 = s.schedule()
    n1 = s.schedule(ahead=True)
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    new = mkreq("a", 3, base=500)
    s.add_request(new)
    s.update_from_output(n0, one_token({"a": 7}))  # the old request's result: discarded
    n2 = s.schedule(ahead=True)
    assert view(n2) == [("a", 0, [500, 501, 502], True)]
    assert [r.request_id for r in s.update_from_output(n1, one_token({"a": 8}))] == []  # old again: discarded
    assert new.output_token_ids == [] and new.num_pending_tokens == 1
    assert s.update_from_output(n2, one_token({"a": 9})) == [(new, [9])]
    assert new.output_token_ids == [9] and old.output_token_ids == []


def test_stop_found_in_step_n_discards_step_n_plus_1():
    s = mksched()
    a = mkreq("a", 5)
    s.add_request(a)
    n0 = s.schedule()
    n1 = s.schedule(ahead=True)
    assert [r for r, _ in s.update_from_output(n0, one_token({"a": EOS}))] == [a]
    assert a.status == RequestStatus.FINISHED_STOPPED and a.output_token_ids == [EOS]
    assert s.update_from_output(n1, one_token({"a": 9})) == []
    assert a.output_token_ids == [EOS]
    assert sum(s.blocks.ref_cnt) == 0


def test_chunked_prefill_continues_ahead_with_real_tokens():
    s = mksched(budget=4)
    a = mkreq("a", 10)
    s.add_request(a)
    n0 = s.schedule()
    n1 = s.schedule(ahead=True)
    assert view(n0) == [("a", 0, [100, 101, 102, 103], False)]
    assert view(n1) == [("a", 4, [104, 105, 106, 107], False)]
    assert a.num_pending_tokens == 0
    assert s.update_from_output(n0, one_token({})) == [(a, [])]
    n2 = s.schedule(ahead=True)
    assert view(n2) == [("a", 8, [108, 109], True)]
    s.update_from_output(n1, one_token({}))
    n3 = s.schedule(ahead=True)
    assert view(n3) == [("a", 10, [PLACEHOLDER], True)]
    s.update_from_output(n2, one_token({"a": 7}))
    s.update_from_output(n3, one_token({"a": 8}))
    assert a.output_token_ids == [7, 8]


def test_siblings_wait_for_a_real_token_of_the_leader():
    s = mksched()
    leader = mkreq("r#0", 9)
    sib = mkreq("r#1", 9)
    s.add_request(leader)
    s.add_request(sib, leader)
    n0 = s.schedule()
    assert leader.num_computed_tokens == 9  # progress ran ahead of the cache...
    n1 = s.schedule(ahead=True)
    assert view(n1) == [("r#0", 9, [PLACEHOLDER], True)]  # ...so the sibling still waits
    s.update_from_output(n0, one_token({"r#0": 7}))
    n2 = s.schedule(ahead=True)
    assert [(x.request_id, x.start_pos) for x in n2.scheduled] == [("r#0", 10), ("r#1", 8)]
    assert sib.num_cached_tokens == 8


# -- randomized: one step always in flight, against a simulated KV cache -----------------


class AheadKV:
    """Slots written by each step, with placeholders resolved from the step before.

    The 'device' decides each step's sampled tokens when the step runs; the
    next step's placeholders read them. Every read of a position must find
    the token the request really has there.
    """

    def __init__(self, num_blocks: int) -> None:
        self.slots = [[None] * BS for _ in range(num_blocks)]
        self.last_sampled: dict[str, int] = {}
        self.truth: dict[str, list[int]] = {}  # request id (unique here) -> its tokens as the device knows them

    def run(self, s: Scheduler, out: SchedulerOutput, rng: random.Random) -> dict[str, int]:
        sampled = {}
        written = set()
        for x in out.scheduled:
            req = s.requests[x.request_id]
            truth = self.truth.setdefault(x.request_id, list(req.token_ids))
            assert truth[: len(req.token_ids)] == req.token_ids
            assert len(truth) + x.sample == req.num_tokens
            # A step ahead that came back empty may have left a block more in a table.
            assert len(x.block_table) >= cdiv(x.start_pos + len(x.token_ids), BS)
            for p in range(x.start_pos):
                got = self.slots[x.block_table[p // BS]][p % BS]
                assert got == truth[p], f"{x.request_id}: position {p} reads {got}, expected {truth[p]}"
            for j, t in enumerate(x.token_ids):
                p = x.start_pos + j
                if t == PLACEHOLDER:
                    t = self.last_sampled[x.request_id]
                    assert j == len(x.token_ids) - 1 and p == len(truth) - 1
                assert t == truth[p]
                b = x.block_table[p // BS]
                assert s.blocks.ref_cnt[b] == 1 and (b, p % BS) not in written
                written.add((b, p % BS))
                self.slots[b][p % BS] = t
            if x.sample:
                tok = rng.choice([EOS, 3] + [7, 8, 9, 11] * 4)
                sampled[x.request_id] = tok
                truth.append(tok)
        self.last_sampled = sampled
        return sampled


@pytest.mark.parametrize("seed", range(6))
def test_randomized_async_steps_keep_invariants_and_kv_contents(seed):
    rng = random.Random(seed)
    num_blocks = 12
    s = mksched(budget=rng.choice([6, 10, 16]), max_seqs=rng.choice([4, 8]), max_len=36, num_blocks=num_blocks,
                caching=rng.random() < 0.7)
    kv = AheadKV(num_blocks)
    in_flight: list[tuple[SchedulerOutput, dict[str, int]]] = []
    added = 0
    num_ahead = num_sync = 0
    reported, sent = [], []

    def launch(out):
        reported.extend(out.finished_request_ids)
        sent.extend(n.request_id for n in out.new_requests)
        in_flight.append((out, kv.run(s, out, rng)))

    for t in range(400):
        if t < 250 and rng.random() < 0.4:
            n = rng.choice([1, 1, 2])
            prompt = [rng.randrange(10, 20) for _ in range(rng.randrange(1, 12))]
            leader = None
            pen = rng.random() < 0.15
            for i in range(n):
                r = mkreq(f"r{added}#{i}", prompt, max_tokens=rng.randrange(1, 36 - len(prompt) + 1),
                          stop_token_ids=[3], repetition_penalty=1.1 if pen else 1.0)
                s.add_request(r, leader)
                leader = leader or r
            added += 1
        if s.requests and rng.random() < 0.05:
            s.finish_request(rng.choice(sorted(s.requests)), RequestStatus.FINISHED_ABORTED)
        # The engine's step: launch one if none is in flight, then one ahead, then update the oldest.
        if not in_flight:
            out = s.schedule()
            if out.is_empty:
                reported.extend(out.finished_request_ids)
                continue
            launch(out)
            num_sync += 1
        out = s.schedule(ahead=True)
        if not out.is_empty:
            launch(out)
            num_ahead += 1
        else:
            reported.extend(out.finished_request_ids)  # the engine sends them with its next step
        out, sampled = in_flight.pop(0)
        s.update_from_output(out, one_token(sampled))
        s.blocks.check_invariants()
        for r in s.waiting:
            assert r.num_pending_tokens == 0 and r.num_computed_tokens == 0
    while in_flight:
        out, sampled = in_flight.pop(0)
        s.update_from_output(out, one_token(sampled))
    for _ in range(3000):  # drain synchronously
        if not s.requests:
            break
        out = s.schedule()
        reported.extend(out.finished_request_ids)
        sent.extend(n.request_id for n in out.new_requests)
        s.update_from_output(out, one_token(kv.run(s, out, rng)))
    assert s.requests == {} and s.num_steps_in_flight == 0
    reported += s.schedule().finished_request_ids
    assert sum(s.blocks.ref_cnt) == 0 and s.blocks.num_free_blocks == num_blocks
    assert sorted(reported) == sorted(sent) and len(sent) == len(set(sent))
    # Both paths ran: steps ahead, synchronous fallbacks, and preemptions in those.
    assert num_ahead > 100 and num_sync > 50 and s.num_preemptions > 10
