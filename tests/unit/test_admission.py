"""Admission control (cluster/admission.py): exact counters, 429 past the limits, 400 for never."""

from __future__ import annotations

import pytest

from fleetlm.cluster.admission import Admission, AdmissionLimits
from fleetlm.cluster.errors import OpenAIError


def mk(w=2, wt=None, seqs=4, replicas=1, max_replicas=1):
    return Admission(AdmissionLimits(w, wt), max_num_seqs=seqs, num_replicas=replicas, max_replicas=max_replicas)


def test_seats_then_waiting_then_429():
    a = mk(w=2)
    tickets = [a.admit([10], 1) for _ in range(6)]  # 4 seats + 2 waiting
    assert a.snapshot() == {"seats": 4, "inflight": 6, "waiting": 2, "prefill_tokens": 60, "rejected": 0}
    with pytest.raises(OpenAIError) as e:
        a.admit([10], 1)
    assert e.value.status_code == 429 and e.value.code == "queue_full" and e.value.headers["Retry-After"] == "1"
    assert a.num_rejected == 1 and a.inflight == 6
    tickets[0].release()
    a.admit([10], 1)
    assert a.inflight == 6


def test_n_and_prompts_count_as_sequences():
    a = mk(w=0, seqs=4)
    t = a.admit([3, 5], 2)  # 2 prompts x n=2 = 4 sequences, (3+5)*2 tokens
    assert (t.num_sequences, a.inflight, a.prefill_tokens) == (4, 4, 16)
    with pytest.raises(OpenAIError):
        a.admit([1], 1)
    t.started(1)
    assert a.prefill_tokens == 6
    t.started(1)  # idempotent
    assert a.prefill_tokens == 6
    t.release()
    t.release()
    assert (a.inflight, a.prefill_tokens) == (0, 0)


def test_token_backlog_limit_but_never_starve_a_long_prompt():
    a = mk(w=None, wt=100)
    big = a.admit([500], 1)  # empty backlog: admitted whatever its size
    with pytest.raises(OpenAIError):
        a.admit([1], 1)
    big.started(0)  # prefilled: its tokens leave the backlog, its seat stays taken
    assert (a.prefill_tokens, a.inflight) == (0, 1)
    a.admit([60], 1)
    a.admit([40], 1)
    with pytest.raises(OpenAIError):
        a.admit([1], 1)


def test_request_larger_than_the_model_at_its_largest_is_400():
    a = mk(w=2, seqs=4, replicas=1, max_replicas=3)
    with pytest.raises(OpenAIError) as e:
        a.admit([1] * 15, 1, param="prompt")
    assert e.value.status_code == 400 and e.value.param == "prompt"
    with pytest.raises(OpenAIError) as e:  # fits the largest deployment, not the current one: 429
        a.admit([1] * 14, 1)
    assert e.value.status_code == 429


def test_replica_count_moves_the_seats():
    a = mk(w=0, seqs=2, replicas=2, max_replicas=2)
    for _ in range(4):
        a.admit([1], 1)
    a.set_replicas(1)  # one died
    assert (a.seats, a.num_waiting) == (2, 2)
    with pytest.raises(OpenAIError):
        a.admit([1], 1)


def test_disabled_limits_admit_everything():
    a = mk(w=None, wt=None)
    assert not a.limits.enabled
    for _ in range(100):
        a.admit([1000], 16)
    assert a.inflight == 1600
