"""The multi-token paths of the step contract (engine/step.py), driven by hand.

Nothing proposes tokens yet (speculative decoding builds on this): here a
test sets ``Request.spec_token_ids`` itself, then plays the workers'
part with chosen accepted tokens, and checks what the scheduler and the
block manager make of it.
"""

from __future__ import annotations

import pytest

from fleetlm.engine.block_manager import cdiv
from fleetlm.engine.config import CacheConfig, SchedulerConfig
from fleetlm.engine.request import Request, RequestStatus
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.engine.scheduler import Scheduler
from fleetlm.engine.step import ModelRunnerOutput, ScheduledRequest

BS = 4
EOS = 2


def mksched(budget=64, max_len=256, num_blocks=64, caching=True):
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=max_len),
                     CacheConfig(block_size=BS, enable_prefix_caching=caching), num_blocks)


def decoding(s: Scheduler, rid="a", prompt_len=6, max_tokens=32) -> Request:
    """A request past its prefill: prompt computed, one output token (its pending one is real)."""
    req = Request(rid, list(range(100, 100 + prompt_len)), SamplingParams(max_tokens=max_tokens), BS,
                  eos_token_ids=(EOS,))
    s.add_request(req)
    out = s.schedule()
    s.update_from_output(out, {rid: [50]})
    return req


def test_scheduled_request_names_its_proposals():
    x = ScheduledRequest("a", [7, 8, 9], 10, [0, 1, 2], sample=True, num_spec_tokens=2)
    assert (x.num_logits, x.spec_token_ids) == (3, [8, 9])
    assert ScheduledRequest("a", [7], 10, [0], sample=False).num_logits == 0
    out = ModelRunnerOutput(["a", "b"], [[8, 9, 4], [3]])
    assert out.by_request() == {"a": [8, 9, 4], "b": [3]} and out.logprobs_by_request() == {}


def test_proposals_are_scheduled_after_the_newest_token():
    s = mksched()
    req = decoding(s)
    req.spec_token_ids = [60, 61, 62]
    out = s.schedule()
    (x,) = out.scheduled
    assert (x.token_ids, x.start_pos, x.sample, x.num_spec_tokens) == ([50, 60, 61, 62], 6, True, 3)
    assert req.num_computed_tokens == 10 and req.num_pending_tokens == 1
    assert len(x.block_table) == cdiv(10, BS)  # KV slots for every proposal
    assert req.spec_token_ids == []  # proposals are for one step


@pytest.mark.parametrize("accepted, computed", [
    ([60, 61, 62, 63], 10),  # all three agreed, plus the token after them
    ([60, 61, 9], 9),        # two agreed, the third replaced
    ([9], 7),                # none agreed: one token, as without proposals
])
def test_rejected_proposals_roll_back_and_give_their_blocks_back(accepted, computed):
    s = mksched()
    req = decoding(s)  # 7 real tokens: 6 prompt + 50
    free_before = s.blocks.num_free_blocks
    req.spec_token_ids = [60, 61, 62]
    out = s.schedule()
    assert s.update_from_output(out, {"a": accepted}) == [(req, accepted)]
    assert req.token_ids[7:] == accepted and req.num_pending_tokens == 0
    # The K/V of the newest token and of the agreed proposals stay; the last accepted token is not computed yet.
    assert req.num_computed_tokens == computed == len(req.token_ids) - 1
    assert len(s.blocks.blocks_of("a")) == cdiv(computed, BS)
    assert s.blocks.num_free_blocks == free_before - (cdiv(computed, BS) - cdiv(6, BS))
    s.blocks.check_invariants()
    nxt = s.schedule()  # the next step computes the last accepted token
    assert [(x.token_ids, x.start_pos) for x in nxt.scheduled] == [([accepted[-1]], computed)]


def test_a_stop_token_among_the_accepted_ends_the_request_there():
    s = mksched()
    req = decoding(s)
    req.spec_token_ids = [60, EOS, 62]
    out = s.schedule()
    assert s.update_from_output(out, {"a": [60, EOS, 62, 63]}) == [(req, [60, EOS])]
    assert req.status == RequestStatus.FINISHED_STOPPED and req.output_token_ids == [50, 60, EOS]
    assert s.blocks.num_free_blocks == s.blocks.num_blocks  # finished: everything back (cached or not)
    s.blocks.check_invariants()


def test_proposals_are_bounded_by_budget_and_max_tokens():
    s = mksched(budget=3)
    req = decoding(s, prompt_len=2)  # a prefill that fits the budget
    req.spec_token_ids = [60, 61, 62, 63]
    assert s.schedule().scheduled[0].num_spec_tokens == 2  # 1 + 2 = the budget
    s2 = mksched()
    req = decoding(s2, max_tokens=3)  # 1 output so far: room for 2 more, the step's own first
    req.spec_token_ids = [60, 61, 62]
    assert s2.schedule().scheduled[0].num_spec_tokens == 1


def test_no_step_is_scheduled_ahead_of_a_verify_step():
    s = mksched()
    req = decoding(s)
    req.spec_token_ids = [60, 61]
    first = s.schedule()
    assert first.scheduled[0].num_spec_tokens == 2
    # How many tokens the verify step yields is unknown until it is back: nothing ahead.
    assert s.schedule(ahead=True).is_empty
    s.update_from_output(first, {"a": [60, 7]})
    req.spec_token_ids = [70]
    nxt = s.schedule()
    assert nxt.scheduled[0].num_spec_tokens == 1  # verify steps follow one another synchronously


def test_prefix_cache_holds_only_accepted_tokens():
    s = mksched()
    req = decoding(s, prompt_len=6)  # tokens 100..105, 50
    req.spec_token_ids = [60, 61, 62, 63, 64]  # would fill positions 7..11
    out = s.schedule()
    s.update_from_output(out, {"a": [60, 9]})  # keeps 60, then 9: real tokens 100..105 50 60 9
    out = s.schedule()  # computes 9; its result registers the blocks full of computed real tokens
    s.update_from_output(out, {"a": [1]})
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    # Blocks 0 and 1 (positions 0..7) hold real tokens; block 2 held the K/V of the
    # proposals 61..64 (positions 8..11) until the rollback, and was never cached.
    again = Request("b", list(range(100, 106)) + [50, 60, 9, 1], SamplingParams(max_tokens=4), BS)
    assert len(s.blocks.get_computed_blocks(again)) == 2
    wrong = Request("c", list(range(100, 106)) + [50, 60, 61, 62, 63, 64, 1], SamplingParams(max_tokens=4), BS)
    assert len(s.blocks.get_computed_blocks(wrong)) == 2
    s.blocks.check_invariants()


def test_trim_keeps_shared_blocks_and_frees_private_tail():
    s = mksched()
    req = decoding(s, prompt_len=6)
    table = list(s.blocks.blocks_of("a"))
    s.blocks.trim("a", 4)
    assert s.blocks.blocks_of("a") == table[:1]
    s.blocks.trim("a", 4)  # idempotent
    assert s.blocks.blocks_of("a") == table[:1]
    s.blocks.trim("missing", 0)  # a request without a table: nothing happens
    s.blocks.check_invariants()
    assert req.request_id == "a"
