"""MigratingJob (cluster/migration.py) over scripted fake replica streams: no Ray actors, no model.

Each fake stream plays a script of chunks; a script may end with an exception (the
replica died) or a retryable error chunk (its engine died). The job must hand every
delta to the consumer once, re-submit unfinished choices with the tokens already
produced, and give up cleanly after its attempts.
"""

from __future__ import annotations


import asyncio
from dataclasses import dataclass

import pytest

from fleetlm.cluster import errors, migration
from fleetlm.cluster.errors import OpenAIError
from fleetlm.cluster.migration import MigratingJob, continuation, is_retryable
from fleetlm.cluster.messages import ChoiceDelta, GenerateChunk, ReplicaError
from fleetlm.engine.sampling_params import SamplingParams

from ray import exceptions as ray_exc


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(migration, "BACKOFF_S", (0.0,))


@dataclass(frozen=True)
class Req:  # the fields of GenerateRequest the job reads or replaces
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    resume_token_ids: tuple[int, ...] = ()
    resume_text_len: int = 0
    attempt: int = 0


class FakeStream:
    def __init__(self, script):
        self.script = list(script)
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if not self.script:
            raise StopAsyncIteration
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


def chunk(*deltas, finished=False, error=None):
    """deltas: (choice index, text, token ids[, finish_reason])."""
    return GenerateChunk(choices=[ChoiceDelta(d[0], d[1], d[2], None, *d[3:]) for d in deltas],
                         finished=finished, error=error)


class Replicas:
    """generate(req): the next script for that request, recorded with the request."""

    def __init__(self, scripts):
        self.scripts = scripts  # request_id -> script
        self.calls = []

    def __call__(self, req):
        self.calls.append(req)
        return FakeStream(self.scripts[req.request_id])


def map_exception(e):
    return e if isinstance(e, OpenAIError) else errors.internal(repr(e))


async def drain(make):
    """Build the job inside the running loop (its pumps are tasks), then read it to the end."""
    job = make()
    out = []
    try:
        while (item := await job.next()) is not None:
            out.append(item)
    finally:
        job.close()
    return out, job


def texts(items, n=1):
    acc = {}
    for g, c in items:
        for d in c.choices:
            acc.setdefault((g, d.index), []).append((d.text, d.token_ids, d.finish_reason))
    return acc


def run(coro):
    return asyncio.run(coro)


DIED = ray_exc.ActorDiedError()


def test_undisturbed_stream_passes_through():
    reps = Replicas({"r-0": [chunk((0, "a", [1])), chunk((0, "b", [2], "length"), finished=True)]})
    items, job = run(drain(lambda: MigratingJob(reps, [Req("r-0", [9], SamplingParams(max_tokens=2))], 1,
                                                map_exception)))
    assert texts(items) == {(0, 0): [("a", [1], None), ("b", [2], "length")]}
    assert job.num_migrations == 0


def test_replica_death_mid_stream_continues_with_tokens_so_far():
    reps = Replicas({
        "r-0": [chunk((0, "a", [1])), chunk((0, "b", [2])), DIED],
        "r-0.m1": [chunk((0, "c", [3])), chunk((0, "d", [4], "length"), finished=True)],
    })
    migrated = []
    items, _ = run(drain(lambda: MigratingJob(
        reps, [Req("r-0", [9], SamplingParams(max_tokens=4, temperature=0))], 1, map_exception,
        on_migrate=lambda s, why: migrated.append((s.index, list(s.token_ids), why)))))
    assert texts(items) == {(0, 0): [("a", [1], None), ("b", [2], None), ("c", [3], None), ("d", [4], "length")]}
    cont = reps.calls[1]
    assert (cont.request_id, cont.resume_token_ids, cont.resume_text_len, cont.attempt) == ("r-0.m1", (1, 2), 2, 1)
    assert cont.params == reps.calls[0].params and cont.prompt_token_ids == [9]
    assert migrated == [(0, [1, 2], "ActorDiedError: " + str(DIED))]


def test_retryable_error_chunk_migrates_but_others_surface():
    dead = ReplicaError("unavailable", "engine died", retryable=True)
    reps = Replicas({
        "r-0": [chunk((0, "a", [1])), chunk(error=dead)],
        "r-0.m1": [chunk((0, "b", [2], "stop"), finished=True)],
        "s-0": [chunk(error=ReplicaError("invalid_request", "bad"))],
    })
    items, _ = run(drain(lambda: MigratingJob(reps, [Req("r-0", [9], SamplingParams())], 1, map_exception)))
    assert texts(items) == {(0, 0): [("a", [1], None), ("b", [2], "stop")]}
    items, _ = run(drain(lambda: MigratingJob(reps, [Req("s-0", [9], SamplingParams())], 1, map_exception)))
    assert [c.error.kind for _, c in items] == ["invalid_request"]


def test_not_started_request_simply_retries():
    reps = Replicas({"r-0": [DIED], "r-0.m1": [chunk((0, "x", [5], "length"), finished=True)]})
    items, _ = run(drain(lambda: MigratingJob(reps, [Req("r-0", [9], SamplingParams())], 1, map_exception)))
    assert texts(items) == {(0, 0): [("x", [5], "length")]}
    assert reps.calls[1].resume_token_ids == ()


def test_n_choices_migrate_one_by_one_with_child_seeds():
    params = SamplingParams(n=2, seed=7, max_tokens=3)
    reps = Replicas({
        "r-0": [chunk((0, "a", [1]), (1, "p", [11])), chunk((1, "q", [12], "stop")), DIED],
        "r-0#0.m1": [chunk((0, "b", [2])), chunk((0, "c", [3], "length"), finished=True)],
    })
    items, _ = run(drain(lambda: MigratingJob(reps, [Req("r-0", [9], params)], 2, map_exception)))
    assert texts(items) == {
        (0, 0): [("a", [1], None), ("b", [2], None), ("c", [3], "length")],
        (0, 1): [("p", [11], None), ("q", [12], "stop")],
    }
    (cont,) = reps.calls[1:]  # the finished choice 1 is not re-submitted
    assert cont.params.n == 1 and cont.params.seed == 7 and cont.resume_token_ids == (1,)


def test_gives_up_after_max_attempts_with_a_clean_503():
    reps = Replicas({"r-0": [chunk((0, "a", [1])), DIED], "r-0.m1": [DIED], "r-0.m2": [DIED]})
    with pytest.raises(OpenAIError) as e:
        run(drain(lambda: MigratingJob(reps, [Req("r-0", [9], SamplingParams())], 1, map_exception,
                                       max_attempts=3)))
    assert e.value.status_code == 503 and e.value.code == "unavailable"
    assert [c.request_id for c in reps.calls] == ["r-0", "r-0.m1", "r-0.m2"]


def test_non_retryable_exception_is_mapped():
    reps = Replicas({"r-0": [ValueError("boom")]})
    with pytest.raises(OpenAIError) as e:
        run(drain(lambda: MigratingJob(reps, [Req("r-0", [9], SamplingParams())], 1, map_exception)))
    assert e.value.status_code == 500


def test_close_cancels_live_streams():
    async def go():
        stream = FakeStream([chunk((0, "a", [1]))] + [chunk((0, "b", [2]))] * 1000)
        job = MigratingJob(lambda req: stream, [Req("r-0", [9], SamplingParams())], 1, map_exception)
        await job.next()
        job.close()
        await asyncio.sleep(0.01)
        return stream

    assert run(go()).cancelled


def test_started_callback_once_per_prompt():
    started = []
    reps = Replicas({"r-0": [DIED], "r-0.m1": [chunk((0, "a", [1])), chunk((0, "b", [2], "stop"), finished=True)],
                     "r-1": [chunk((0, "z", [3], "stop"), finished=True)]})
    reqs = [Req("r-0", [9], SamplingParams()), Req("r-1", [9], SamplingParams())]
    run(drain(lambda: MigratingJob(reps, reqs, 1, map_exception, on_started=started.append)))
    assert sorted(started) == [0, 1]


def test_retryable_classification():
    from ray.serve.exceptions import BackPressureError

    assert is_retryable(ray_exc.ActorDiedError()) and is_retryable(ray_exc.ActorUnavailableError("x", None))
    assert not is_retryable(ValueError()) and not is_retryable(BackPressureError(num_queued_requests=1,
                                                                                max_queued_requests=1))


def test_continuation_request_id_and_resume():
    r = Req("cmpl-1-0", [9, 8], SamplingParams(n=3, seed=5))
    s = migration.SequenceProgress(0, 2, token_ids=[4, 5], text_len=3)
    c = continuation(r, s, 3, 1)
    assert (c.request_id, c.resume_token_ids, c.resume_text_len, c.params.n, c.params.seed) == \
        ("cmpl-1-0#2.m1", (4, 5), 3, 1, 7)



def test_a_continuation_asks_for_the_prompts_logprobs_only_if_its_choice_has_sent_nothing():
    """echo + logprobs: the prompt's logprobs come with a choice's first output."""
    r = Req("cmpl-1-0", [9, 8], SamplingParams(n=2, logprobs=1, prompt_logprobs=1))
    fresh = continuation(r, migration.SequenceProgress(0, 1), 2, 1)
    assert fresh.params.prompt_logprobs == 1  # child 1 of a clone would not compute them
    started = continuation(r, migration.SequenceProgress(0, 0, token_ids=[4], text_len=1), 2, 1)
    assert started.params.prompt_logprobs is None and started.params.logprobs == 1
    plain = continuation(Req("cmpl-2-0", [9], SamplingParams(n=1)), migration.SequenceProgress(0, 0), 1, 1)
    assert plain.params.prompt_logprobs is None

class ResumingEngine:
    """AsyncEngine's surface for LLMReplica: records how each request was started."""

    def __init__(self):
        from types import SimpleNamespace

        self.calls = []
        self.config = SimpleNamespace(scheduler=SimpleNamespace(max_num_seqs=2), cache=SimpleNamespace(block_size=4))
        self.model_config = SimpleNamespace(max_model_len=64, vocab_size=100)
        self.tokenizer = None

    def stats(self):
        from types import SimpleNamespace

        return SimpleNamespace(num_running=0, num_waiting=0, kv_cache_usage=0.0,
                               prefix_cache_queried_tokens=0, prefix_cache_hit_tokens=0, num_preemptions=0)

    async def generate(self, prompt, params, request_id, prior_output_token_ids=None, coalesce_s=None):
        from fleetlm.engine.outputs import CompletionOutput, RequestOutput

        self.calls.append((list(prompt), params, request_id, prior_output_token_ids))
        yield RequestOutput(request_id, None, list(prompt), [CompletionOutput(0, "z", [42], finish_reason="length")],
                            finished=True)


def test_replica_resumes_a_migrated_sequence_through_the_engine():
    """The continuation keeps the original prompt and budget; the engine gets the tokens
    already sent as prior output (they count toward max_tokens, penalties and seeds)."""
    from fleetlm.cluster.messages import GenerateRequest
    from fleetlm.cluster.replica import LLMReplica
    from fleetlm.cluster.serve_config import ModelDeploymentConfig

    eng = ResumingEngine()
    rep = LLMReplica(ModelDeploymentConfig(), 4, engine=eng)
    params = SamplingParams(max_tokens=10, min_tokens=4, seed=3, detokenize=False)

    async def go(req):
        return [c async for c in rep.generate(req)]

    fresh = run(go(GenerateRequest("a", [1, 2], params)))
    resumed = run(go(GenerateRequest("b.m1", [1, 2], params, resume_token_ids=(7, 8, 9), attempt=1)))
    assert eng.calls == [([1, 2], params, "a", None), ([1, 2], params, "b.m1", [7, 8, 9])]
    for chunks in (fresh, resumed):
        assert chunks[-1].finished and chunks[-1].choices[0].token_ids == [42]
        assert chunks[-1].num_prompt_tokens == 2  # usage counts the client's prompt only


def test_a_request_that_outlives_two_dead_engines_is_not_retried_again():
    dead = ReplicaError("unavailable", "engine died", retryable=True)
    reps = Replicas({"r-0": [chunk((0, "a", [1])), chunk(error=dead)],
                     "r-0.m1": [chunk(error=dead)],
                     "r-0.m2": [chunk((0, "never", [9], "stop"), finished=True)]})
    with pytest.raises(OpenAIError) as e:
        run(drain(lambda: MigratingJob(reps, [Req("r-0", [9], SamplingParams())], 1, map_exception)))
    assert e.value.status_code == 503 and "twice" in e.value.message
    assert [c.request_id for c in reps.calls] == ["r-0", "r-0.m1"]


def test_bouncing_off_an_engine_already_dead_is_not_a_death():
    """A re-submission Serve routes to the dying replica again is bounced (dead on arrival):
    it costs an attempt, not one of the two engine deaths a sequence may outlive."""
    died = ReplicaError("unavailable", "engine died", retryable=True)
    bounced = ReplicaError("unavailable", "engine is dead", retryable=True, dead_on_arrival=True)
    reps = Replicas({"r-0": [chunk((0, "a", [1])), chunk(error=died)],
                     "r-0.m1": [chunk(error=bounced)],
                     "r-0.m2": [chunk(error=bounced)],
                     "r-0.m3": [chunk((0, "b", [2], "length"), finished=True)]})
    out, job = run(drain(lambda: MigratingJob(reps, [Req("r-0", [9], SamplingParams())], 1, map_exception)))
    assert texts(out) == {(0, 0): [("a", [1], None), ("b", [2], "length")]}
    assert [c.resume_token_ids for c in reps.calls] == [(), (1,), (1,), (1,)]
    assert job.seqs[(0, 0)].engine_deaths == 1 and job.num_migrations == 3
