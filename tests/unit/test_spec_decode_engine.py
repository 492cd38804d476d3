"""Speculative decoding, engine side: config, n-gram lookups, the off switch, draft lookahead slots.

Plain Python over ints (no model): proposals are checked against hand-made
sequences, the scheduler's draft bookkeeping against exact block counts.
"""

from __future__ import annotations

import argparse

import pytest

from fleetlm.engine.block_manager import cdiv
from fleetlm.engine.config import CacheConfig, SchedulerConfig
from fleetlm.engine.request import Request, RequestStatus
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.engine.scheduler import Scheduler
from fleetlm.engine.spec_config import MAX_SPECULATIVE_TOKENS, parse_speculative_config
from fleetlm.engine.spec_decode import SpecDecoder
from fleetlm.engine.spec_ngram import NgramProposer
from fleetlm.engine.spec_policy import SpecPolicy
from fleetlm.engine.step import ModelRunnerOutput

BS = 4


def req(tokens, rid="a", max_tokens=64) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens), BS)


# -- config ------------------------------------------------------------------------


def test_config_takes_vllms_keys_and_defaults():
    c = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                                  "prompt_lookup_min": 2})
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max) == ("ngram", 4, 2, 4)
    assert c.num_verify_tokens == 5 and not c.uses_draft_model
    c = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (5, 5)  # vLLM's defaults
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3,
                                     "prompt_lookup_max": 3}).prompt_lookup_min == 3
    c = parse_speculative_config({"model": "draft", "num_speculative_tokens": 2, "disable_by_batch_size": 8})
    assert (c.method, c.model, c.disable_by_batch_size) == ("draft_model", "draft", 8)
    assert parse_speculative_config(None) is None


@pytest.mark.parametrize("bad, words", [
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer in [1,"),
    ({"method": "ngram", "num_speculative_tokens": MAX_SPECULATIVE_TOKENS + 1}, "num_speculative_tokens"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min (4) is larger than prompt_lookup_max (2)"),
    ({"method": "medusa", "num_speculative_tokens": 2}, "method must be one of ngram, draft_model"),
    ({"method": "ngram", "num_speculative_tokens": 2, "modle": "x"}, "unknown key(s) modle"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs model"),
    ({"num_speculative_tokens": 2}, "needs a method"),
    ({"model": "x", "num_speculative_tokens": 2, "prompt_lookup_max": 3}, "prompt_lookup_max is for method ngram"),
    ({"method": "ngram", "num_speculative_tokens": 2, "min_acceptance_rate": 1.5}, "min_acceptance_rate"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
    ([1, 2], "must be a mapping"),
])
def test_config_errors_name_the_problem(bad, words):
    with pytest.raises(ValueError) as e:
        parse_speculative_config(bad)
    assert words in str(e.value)


def test_engine_args_refuse_a_draft_of_another_vocabulary():
    from fleetlm.engine.args import EngineArgs

    args = EngineArgs(model="smollm2-135m", load_format="dummy", device="cpu",
                      speculative_config={"model": "llama-3.1-8b", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="vocabulary of 128256 tokens, the target 'smollm2-135m' of 49152"):
        args.create_engine_config()
    ok = EngineArgs(model="smollm2-360m", load_format="dummy", device="cpu",
                    speculative_config={"model": "smollm2-135m", "num_speculative_tokens": 2}).create_engine_config()
    assert ok.speculative.draft.kind == "dummy" and ok.speculative.draft.dtype == ok.model.dtype
    # Under tensor parallelism the draft runs whole on the sampling rank (workers/drafter.py).
    tp = EngineArgs(model="llama-3.1-8b", load_format="dummy", device="cpu", tensor_parallel_size=2,
                    speculative_config={"model": "llama-3.2-1b", "num_speculative_tokens": 2}).create_engine_config()
    assert tp.parallel.world_size == 2 and tp.speculative.draft.served_name == "llama-3.2-1b"


def test_cli_flag_parses_and_checks_the_json():
    from fleetlm.cluster.cli import build_parser

    parser = build_parser()
    ns = parser.parse_args(["serve", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    assert ns.speculative_config == {"method": "ngram", "num_speculative_tokens": 3}
    for bad in ("{nope", "[1]", '{"method": "ngram"}'):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--speculative-config", bad])
    assert isinstance(parser, argparse.ArgumentParser)


# -- n-gram lookups ---------------------------------------------------------------


def test_ngram_proposes_what_followed_the_latest_match_longest_first():
    ng = NgramProposer(3, 2, 3)
    # ... 1 2 3 [7 8 9] ... 5 2 3 [4 5 6] ... 2 3  -> the longest suffix "1 2 3"? no: "x 2 3".
    r = req([1, 2, 3, 7, 8, 9, 5, 2, 3, 4, 5, 6, 0, 2, 3])
    assert ng.propose(r) == [4, 5, 6]  # "2 3" last followed by 4 5 6 (latest occurrence)
    r = req([1, 2, 3, 7, 8, 9, 5, 2, 3, 4, 5, 6, 1, 2, 3])
    assert ng.propose(r) == [7, 8, 9]  # "1 2 3" (3 tokens) beats "2 3"
    assert ng.propose(req([1, 2, 3, 4], rid="b")) == []  # no earlier "3 4", nor "2 3 4"


def test_ngram_continuation_repeats_a_period_and_follows_new_tokens():
    ng = NgramProposer(5, 2, 2)
    r = req([9, 1, 2, 1, 2])
    assert ng.propose(r) == [1, 2, 1, 2, 1]  # runs into the end: the pattern goes on
    r.append_token(7)
    r.append_token(1)
    r.append_token(2)
    assert ng.propose(r) == [7, 1, 2, 7, 1]  # indexed incrementally: the newest occurrence wins
    assert ng.propose(r, max_tokens=2) == [7, 1]


def test_ngram_needs_the_minimum_length():
    ng = NgramProposer(2, 3, 4)
    assert ng.propose(req([5, 6, 1, 5, 6])) == []  # "5 6" repeats, but 3 tokens are required
    assert ng.propose(req([5, 6, 7, 1, 5, 6, 7], rid="b")) == [1, 5]


# -- the off switch ---------------------------------------------------------------


def test_policy_pauses_a_request_that_never_agrees_and_probes_it():
    cfg = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 4, "min_acceptance_rate": 0.1,
                                    "probe_interval": 3, "disable_by_batch_size": 2})
    pol = SpecPolicy(cfg)
    assert pol.step_on(2) and not pol.step_on(3)
    r = req([1, 2, 3])
    assert pol.request_on(r)
    verifies = 0
    while pol.request_on(r):
        pol.observe(r, 4, 0)
        verifies += 1
    assert verifies == 7 and pol.rate(r) < 0.1
    seen = []
    for _ in range(7):  # the probes' clock is processed steps
        pol.observe_step(False, batch_size=1)
        seen.append((pol.would_propose(r), pol.request_on(r)))
    assert seen == [(False, False), (False, False), (True, True), (False, False), (False, False), (True, True),
                    (False, False)]
    for _ in range(3):
        pol.observe(r, 4, 4)  # the text turned repetitive: back on
    assert pol.request_on(r) and pol.would_propose(r)


def test_decoder_proposes_only_for_decodes_and_only_below_the_batch_size():
    cfg = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 2,
                                    "prompt_lookup_max": 2, "disable_by_batch_size": 1})
    spec = SpecDecoder(cfg)
    a = req([1, 2, 3, 1, 2])
    a.num_computed_tokens = 4  # its newest token is the only one left: a decode
    b = req([1, 2, 3, 1, 2], rid="b")  # still to prefill
    assert spec.before_schedule([a], []) is False
    assert a.spec_token_ids == [3, 1]
    spec.before_schedule([b], [])
    assert b.spec_token_ids == []
    a.spec_token_ids = [3, 1]
    spec.before_schedule([a, b], [])  # two running: off, and the proposals of the step before are dropped
    assert a.spec_token_ids == [] and spec.stats.num_steps_off == 1
    assert spec.blocks_ahead([a]) and not spec.blocks_ahead([a, b])


# -- draft lookahead in the scheduler ---------------------------------------------


def mksched(num_blocks=64, max_len=256):
    return Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=max_len),
                     CacheConfig(block_size=BS), num_blocks)


def test_draft_steps_allocate_lookahead_and_give_it_back():
    s = mksched()
    r = req(range(100, 106))  # 6 prompt tokens
    r.num_draft_tokens = 3
    s.add_request(r)
    out = s.schedule(draft=True)
    (x,) = out.scheduled
    assert (x.draft_token_ids, x.num_draft_tokens) == ([], 3)
    assert len(x.block_table) == cdiv(6 + 3, BS)  # the draft's KV of its 3 proposals fits
    s.update_from_output(out, ModelRunnerOutput(["a"], [[50]]).by_request())
    assert r.num_draft_computed == 6 and len(s.blocks.blocks_of("a")) == cdiv(6, BS)
    s.blocks.check_invariants()
    # A step without the draft leaves its K/V behind; the next draft step catches up first.
    nxt = s.schedule()
    assert nxt.scheduled[0].draft_token_ids is None
    s.update_from_output(nxt, {"a": [51]})
    assert r.num_draft_computed == 6
    r.spec_token_ids = [52, 53]
    third = s.schedule(draft=True)
    (y,) = third.scheduled
    assert y.draft_token_ids == [50] and y.token_ids == [51, 52, 53] and y.start_pos == 7
    s.update_from_output(third, {"a": [52, 9]})  # one proposal accepted, one rejected
    assert r.num_computed_tokens == 9 and r.num_draft_computed == 9
    s.blocks.check_invariants()


def test_draft_lookahead_respects_max_tokens_and_max_model_len():
    s = mksched(max_len=10)
    r = req(range(100, 106), max_tokens=4)
    r.num_draft_tokens = 3
    s.add_request(r)
    assert s.schedule(draft=True).scheduled[0].num_draft_tokens == 2  # 4 - the step's token - the next one's
    s2 = mksched(max_len=8)
    r2 = req(range(100, 106), max_tokens=2)
    r2.num_draft_tokens = 3
    s2.add_request(r2)
    assert s2.schedule(draft=True).scheduled[0].num_draft_tokens == 0


def test_preemption_and_prefix_hits_make_the_draft_start_over():
    s = mksched()
    first = req(range(100, 110))
    s.add_request(first)
    out = s.schedule(draft=True)
    s.update_from_output(out, {"a": [1]})
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    again = req(range(100, 110), rid="b")  # shares 2 full blocks, cached by "a"
    s.add_request(again)
    (x,) = s.schedule(draft=True).scheduled
    # The cache does not vouch for the draft's K/V of those blocks: the draft computes them.
    assert x.start_pos == 8 and x.draft_token_ids == list(range(100, 108))


def test_engine_counters_are_exported_as_metrics():
    from fleetlm.cluster.metrics import ServeMetrics, render
    from fleetlm.engine.llm_engine import EngineStats

    stats = EngineStats(num_running=1, num_waiting=0, kv_cache_usage=0.5, prefix_cache_queried_tokens=0,
                        prefix_cache_hit_tokens=0, num_preemptions=0, spec_decode_verifies=10,
                        spec_decode_proposed_tokens=40, spec_decode_accepted_tokens=30, spec_decode_emitted_tokens=40)
    text = render([ServeMetrics("m", "r", lambda: stats).collect()]).decode()
    for name, value in (("verifies", 10), ("proposed_tokens", 40), ("accepted_tokens", 30), ("emitted_tokens", 40)):
        assert f'fleetlm_spec_decode_{name}_total{{model="m",replica="r"}} {value:.1f}' in text


def test_the_remote_step_codec_carries_proposals_and_draft_fields():
    from fleetlm.engine.step import ScheduledRequest, SchedulerOutput
    from fleetlm.workers.step_codec import StepDecoder, StepEncoder

    out = SchedulerOutput([ScheduledRequest("a", [5, 60, 61], 7, [1, 2], True, 2, [3, 4], 2),
                           ScheduledRequest("b", [9], 3, [5], True)], step_id=4, num_spec_tokens=2, draft=True)
    assert StepDecoder().decode(StepEncoder().encode(out)) == out


def test_policy_by_default_weighs_tokens_per_verify_against_the_measured_cost(monkeypatch):
    from fleetlm.engine import spec_policy

    cfg = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 4, "probe_interval": 100})
    pol = SpecPolicy(cfg)
    clock = [0.0]
    monkeypatch.setattr(spec_policy.time, "perf_counter", lambda: clock[0])
    for speculating, seconds in [(False, 1.0)] * 4 + [(True, 2.0)] * 4:
        clock[0] += seconds
        pol.observe_step(speculating, batch_size=1)
    clock[0] += 100.0  # the engine idled: not a step
    pol.observe_step(False, batch_size=1)
    assert pol.cost_ratio() == pytest.approx(2.0)
    good, bad = req([1]), req([2], rid="b")
    for _ in range(4):
        pol.observe(good, 4, 2)  # 3 tokens a verify: pays at a cost of 2
        pol.observe(bad, 4, 0)  # 1 token a verify: does not
    assert pol.request_on(good) and not pol.request_on(bad)


def test_the_drafts_catch_up_is_bounded_by_the_step_budget():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=8, max_model_len=256),
                  CacheConfig(block_size=BS), 64)
    r = req(range(100, 112))  # 12 prompt tokens
    r.num_draft_tokens = 2
    s.add_request(r)
    out = s.schedule()  # the prefill without the draft
    s.update_from_output(out, {"a": [1]})
    for t in range(2, 7):  # five decodes without it: 17 tokens behind, more than the budget
        out = s.schedule()
        s.update_from_output(out, {"a": [t]})
    out = s.schedule(draft=True)
    (x,) = out.scheduled
    assert (x.draft_token_ids, x.num_draft_tokens, out.draft) == (None, 0, False)
    r2 = req(range(200, 204), rid="b")  # a newcomer fits: it drafts
    r2.num_draft_tokens = 2
    s.update_from_output(out, {"a": [7]})
    s.add_request(r2)
    out = s.schedule(draft=True)
    assert [(y.request_id, y.draft_token_ids is None, y.num_draft_tokens) for y in out.scheduled] == [
        ("a", True, 0), ("b", False, 2)]
    assert out.draft
    s.update_from_output(out, {"a": [8], "b": [9]})
    s.blocks.check_invariants()


def test_serve_config_carries_the_mapping_to_the_engine():
    from fleetlm.cluster.serve_config import ModelDeploymentConfig

    spec = {"method": "ngram", "num_speculative_tokens": 3}
    entry = ModelDeploymentConfig(speculative_config=spec)
    assert entry.engine_kwargs()["speculative_config"] == spec
    with pytest.raises(ValueError, match="speculative_config must be a mapping"):
        ModelDeploymentConfig(speculative_config="ngram")
