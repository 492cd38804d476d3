"""The engine side of structured output with the embedded model's real tokenizer: the compile
cache, matchers, a step's bitmask rows (proposals included), and how grammars end requests."""

import pytest
import torch

from fleetlm.engine.grammars import InvalidGuidedDecoding
from fleetlm.engine.request import Request, RequestStatus
from fleetlm.engine.sampling_params import GuidedDecodingParams, SamplingParams
from fleetlm.engine.step import ScheduledRequest, SchedulerOutput
from fleetlm.engine.structured_output import StructuredOutput
from fleetlm.kernels.token_bitmask import unpack_token_bitmask
from fleetlm.workers.loader import load_tokenizer, resolve_model


@pytest.fixture(scope="module")
def tok(embedded_model):
    return load_tokenizer(resolve_model(embedded_model, "auto"))


@pytest.fixture(scope="module")
def so(tok):
    s = StructuredOutput(tok, len(tok), (tok.eos_token_id,), pin_memory=False)
    yield s
    s.shutdown()


def request(so, rid, guided=None, prior=(), **kw):
    params = SamplingParams(guided_decoding=guided, **kw)
    req = Request(rid, [1, 2, 3], params, 16, eos_token_ids=(so.eos_token_ids[0],), prior_output_token_ids=list(prior))
    if guided is not None:
        assert so.ready([req], so.prepare(params)) or so.ready([req], _wait(so.prepare(params)))
    return req


def _wait(fut):
    fut.result(timeout=120)
    return fut


def step(*reqs_and_props):
    return SchedulerOutput(scheduled=[
        ScheduledRequest(r.request_id, [0] + list(p), 3, [0], sample=True, num_spec_tokens=len(p))
        for r, p in reqs_and_props])


def allowed(so, mask_row) -> set[int]:
    return set(unpack_token_bitmask(mask_row.unsqueeze(0), so.vocab_size)[0].nonzero().flatten().tolist())


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_same_grammar_compiles_once_and_bad_ones_raise_before_compiling(so):
    a = so.prepare(SamplingParams(guided_decoding=GuidedDecodingParams(json={"type": "object", "properties": {}})))
    n = so.num_compiles if a.done() else None
    b = so.prepare(SamplingParams(guided_decoding=GuidedDecodingParams(json='{"type": "object", "properties": {}}')))
    assert a is b
    a.result(timeout=120)
    assert n is None or so.num_compiles == n
    with pytest.raises(InvalidGuidedDecoding, match="regex"):
        so.prepare(SamplingParams(guided_decoding=GuidedDecodingParams(regex="(")))


def test_bitmask_rows_follow_each_matcher_and_skip_free_requests(so, tok):
    yes = request(so, "a", GuidedDecodingParams(choice=["yes", "no"]))
    free = request(so, "b")
    digits = request(so, "c", GuidedDecodingParams(regex="[0-9]+"))
    g = so.bitmask(step((yes, []), (free, []), (digits, [])), {r.request_id: r for r in (yes, free, digits)})
    assert g.request_ids == ["a", "c"] and g.bitmask.shape == (2, -(-so.vocab_size // 32))
    first = allowed(so, g.bitmask[0])
    assert ids(tok, "yes")[0] in first and ids(tok, "no")[0] in first
    assert so.eos_token_ids[0] not in first  # nothing chosen yet: the grammar cannot end
    assert all(tok.decode([t]).isdigit() for t in allowed(so, g.bitmask[1]))
    # Only running requests count: one that ended is sampled freely (its sample is discarded).
    assert so.bitmask(step((yes, [])), {}) is None


def test_proposals_get_one_row_each_and_the_matcher_is_rolled_back(so, tok):
    req = request(so, "p", GuidedDecodingParams(regex="abcabc"))
    a, b, c = (ids(tok, ch)[0] for ch in "abc")
    g = so.bitmask(step((req, [a, b, a, c])), {"p": req})  # the third proposal breaks the grammar
    rows = [allowed(so, g.bitmask[i]) for i in range(5)]
    assert a in rows[0] and all("abcabc".startswith(tok.decode([t])) for t in rows[0])
    assert b in rows[1] and a not in rows[1]
    assert c in rows[2] and a not in rows[2]  # the refused proposal is masked at its own row
    assert rows[3] == rows[4] == set(range(so.vocab_size))  # after the refusal: all-allowed, discarded anyway
    # Rolled back: the matcher is where it was, and a clean walk still works.
    assert so.valid_prefix(req, [a, b, c, a]) == 4 and so.valid_prefix(req, [b]) == 0
    # A proposed EOS ends the grammar: the rows after it are all-allowed (discarded), and nothing breaks.
    done = request(so, "q", GuidedDecodingParams(choice=["ab"]))
    a_b, eos = ids(tok, "ab"), so.eos_token_ids[0]
    g = so.bitmask(step((done, a_b + [eos, a])), {"q": done})
    assert eos in allowed(so, g.bitmask[len(a_b)]) and allowed(so, g.bitmask[len(a_b) + 1]) == set(range(so.vocab_size))
    assert so.valid_prefix(done, a_b + [eos, a]) == len(a_b) + 1


def test_advance_ends_a_request_whose_grammar_ended_even_with_ignore_eos(so, tok):
    req = request(so, "e", GuidedDecodingParams(choice=["no"]), ignore_eos=True)
    req.status = RequestStatus.RUNNING
    tokens = ids(tok, "no")
    assert so.advance([(req, tokens)]) == []
    assert so.advance([(req, [so.eos_token_ids[0]])]) == [(req, RequestStatus.FINISHED_STOPPED)]
    other = request(so, "f", GuidedDecodingParams(choice=["no"]))
    other.status = RequestStatus.RUNNING
    assert so.advance([(other, ids(tok, "yes")[:1])]) == [(other, RequestStatus.FINISHED_ERROR)]


def test_prior_output_of_a_migrated_request_advances_its_matcher(so, tok):
    prior = ids(tok, "12")
    req = request(so, "m", GuidedDecodingParams(regex="12[a-z]"), prior=prior)
    g = so.bitmask(step((req, [])), {"m": req})
    assert all(tok.decode([t]).isalpha() for t in allowed(so, g.bitmask[0]))
    params = SamplingParams(guided_decoding=GuidedDecodingParams(regex="[a-z]+"))
    bad = Request("n", [1], params, 16, prior_output_token_ids=prior)
    with pytest.raises(ValueError, match="prior output token"):
        so.ready([bad], _wait(so.prepare(params)))


def test_bitmask_is_int32_on_the_host(so):
    req = request(so, "t", GuidedDecodingParams(json_object=True))
    g = so.bitmask(step((req, [])), {"t": req})
    assert g.bitmask.dtype == torch.int32 and g.bitmask.device.type == "cpu"
