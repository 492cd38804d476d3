"""The replica streams of one HTTP request, merged, and moved to another replica when theirs dies.

An HTTP request is one engine request per prompt (each with ``n`` choices).
:class:`MigratingJob` runs one replica stream per prompt and merges their
chunks into one queue for the response writer (SSE or one JSON body).

Migration: when a stream fails in a way that says "the replica is gone or
unusable" (the replica actor died or became unreachable, or the replica
reports its engine dead: a *retryable* error chunk), every unfinished choice
of that prompt is re-submitted on its own (``n=1``, the child's own seed as
the engine would have given it) with the tokens it already produced as
``resume_token_ids``. The replica continues the sequence from there; the
client sees the choice continue, with no token twice and none missing,
because the job forwards each delta once and the continuation starts after
the last token forwarded. A request that had produced nothing yet simply
starts again. Each sequence gets at most ``max_attempts`` streams; after
that (or on an error that is not retryable) the consumer gets a clean
:class:`OpenAIError` (503 ``unavailable``).

The replica continues the sequence with the engine's own resume
(``AsyncEngine.generate(..., prior_output_token_ids=...)``): the tokens
already produced count as output for ``max_tokens``, ``min_tokens``,
penalties and seeded sampling, so under greedy decoding the continued output
equals an undisturbed run's, and with a seed it is the same as the
undisturbed run's too (the draws are keyed on the seed and the output
position). One gap: a stop *string* that would straddle the resume point is
not matched (the engine sees the earlier tokens' text as already emitted).

A sequence whose engine died under it twice is not re-submitted again (the
request itself may be what kills engines), and a re-submission that no
replica takes within ``CONTINUATION_START_TIMEOUT_S`` counts as failed, so
"no replica left" ends in a clean error rather than a wait.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleetlm.cluster import errors
from fleetlm.cluster.errors import OpenAIError

logger = logging.getLogger("fleetlm.migration")

MAX_ATTEMPTS = 6  # streams per sequence, the first one included
# A sequence whose engine died under it twice is not re-submitted again: the
# request itself may be what kills engines, and migrating it would take down
# one replica after another.
MAX_ENGINE_DEATHS = 2
# A re-submitted sequence must hear from some replica within this long (Serve
# holds requests while no replica is up): else that attempt failed.
CONTINUATION_START_TIMEOUT_S = 60.0
# Pause before attempt k (k >= 1): Serve needs a moment to drop a dead replica
# from its routing table, else the retry may be routed to it again. About 7 s
# in all: longer than a failed replica takes to end itself (replica.py), short
# enough that a client with no replica left hears so promptly.
BACKOFF_S = (0.0, 0.05, 0.3, 1.0, 2.0, 4.0)

_EOF = object()


def is_retryable(e: BaseException) -> bool:
    """An exception from a replica stream that means "that replica is gone": retry elsewhere."""
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    return isinstance(e, (
        ray_exc.RayActorError,  # ActorDiedError, ActorUnavailableError
        ray_exc.WorkerCrashedError,
        ray_exc.NodeDiedError,
        ray_exc.ObjectLostError,  # the stream's objects lived on the dead node
        serve_exc.ReplicaUnavailableError,
    ))


@dataclass
class SequenceProgress:
    """What the client has received of one choice (prompt ``group``, choice ``index``)."""

    group: int
    index: int
    token_ids: list[int] = field(default_factory=list)
    text_len: int = 0
    finished: bool = False
    attempts: int = 1
    migrations: int = 0
    engine_deaths: int = 0  # engines that died while running this sequence


def continuation(req: Any, seq: SequenceProgress, n: int, attempt: int) -> Any:
    """The ``GenerateRequest`` that continues one choice of ``req`` on another replica."""
    params = req.params
    if n > 1:
        # The engine gives child i of an n-request clone_for_child(i): n=1, seed+i.
        params = params.clone_for_child(seq.index)
    if req.params.prompt_logprobs is not None:
        # The prompt's logprobs come with a choice's first output: a choice that has
        # sent some already has them, one that has sent none still needs them.
        params = dataclasses.replace(params, prompt_logprobs=None if seq.token_ids else req.params.prompt_logprobs)
    suffix = f"#{seq.index}" if n > 1 else ""
    return dataclasses.replace(
        req,
        request_id=f"{req.request_id}{suffix}.m{attempt}",
        params=params,
        resume_token_ids=tuple(seq.token_ids),
        resume_text_len=seq.text_len,
        attempt=attempt,
    )


def unreleased_text(tokenizer: Any, prompt_token_ids: list[int], params: Any,
                    resume_token_ids: tuple[int, ...], released_len: int) -> str:
    """Text of ``resume_token_ids`` the client has not received (held back as a possible stop string).

    The continuation's engine sees those tokens as prompt and never emits
    their text, so the replica sends it first. An incomplete trailing
    character is left out (its bytes are completed by the next token, whose
    text the continuation emits).
    """
    from fleetlm.engine.detokenizer import IncrementalDetokenizer

    if not resume_token_ids or not params.detokenize:
        return ""
    detok = IncrementalDetokenizer(tokenizer, list(prompt_token_ids), params)
    detok.update(list(resume_token_ids))
    detok.flush()
    return detok.output_text[released_len:].rstrip("\ufffd")


class MigratingJob:
    """The replica streams of one HTTP request, merged into one queue, migrated on replica failure.

    ``generate(req)`` starts a replica stream (an async iterator of
    ``GenerateChunk`` with ``cancel()``); ``map_exception`` turns a stream's
    exception that is not migrated into the client's error. ``next()`` returns ``(prompt index,
    chunk)`` pairs, each choice delta once, with choice indices as in the
    original request, until every sequence has ended; ``close()`` cancels
    everything still running (the replicas then abort their engine requests).
    """

    def __init__(self, generate: Callable[[Any], Any], gen_reqs: list[Any], n: int,
                 map_exception: Callable[[BaseException], OpenAIError],
                 max_attempts: int = MAX_ATTEMPTS,
                 on_migrate: Callable[[SequenceProgress, str], None] | None = None,
                 on_started: Callable[[int], None] | None = None) -> None:
        self._generate = generate
        self._map_exception = map_exception
        self._reqs = gen_reqs
        self._n = n
        self.max_attempts = max_attempts
        self._on_migrate = on_migrate
        self._on_started = on_started
        self._queue: asyncio.Queue = asyncio.Queue()
        self._open = 0
        self._tasks: set[asyncio.Task] = set()
        self._streams: set[Any] = set()
        self.seqs = {(i, j): SequenceProgress(i, j) for i in range(len(gen_reqs)) for j in range(n)}
        self._started: set[int] = set()
        self.closed = False
        for i, req in enumerate(gen_reqs):
            self._spawn(i, None, req, 0.0)

    @property
    def num_migrations(self) -> int:
        return sum(s.migrations for s in self.seqs.values())

    # -- pumps ----------------------------------------------------------------------
    def _spawn(self, group: int, only: int | None, req: Any, delay_s: float) -> None:
        self._open += 1
        task = asyncio.ensure_future(self._pump(group, only, req, delay_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _mark_started(self, group: int) -> None:
        if group not in self._started:
            self._started.add(group)
            if self._on_started is not None:
                self._on_started(group)

    async def _pump(self, group: int, only: int | None, req: Any, delay_s: float) -> None:
        """One replica stream: the choices of prompt ``group`` (or just choice ``only``)."""
        failure: str | None = None
        stream = None
        try:
            if delay_s:
                await asyncio.sleep(delay_s)
            stream = self._generate(req)
            self._streams.add(stream)
            chunks = aiter(stream)
            first = True
            while True:
                try:
                    if first and getattr(req, "attempt", 0) > 0:
                        chunk = await asyncio.wait_for(anext(chunks), CONTINUATION_START_TIMEOUT_S)
                    else:
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    failure = "the replica stream ended early"
                    break
                except asyncio.TimeoutError:
                    failure = f"no replica answered within {CONTINUATION_START_TIMEOUT_S:.0f} s"
                    break
                first = False
                err = chunk.error
                if err is not None and getattr(err, "retryable", False):
                    failure = f"replica reported: {err.message}"
                    if not getattr(err, "dead_on_arrival", False):
                        # This engine died while running the sequence (not one already dead
                        # that Serve routed the re-submission to before the replica ended).
                        for s in self._affected(group, only):
                            s.engine_deaths += 1
                    break
                if only is not None:
                    for d in chunk.choices:
                        d.index = only
                for d in chunk.choices:
                    s = self.seqs[(group, d.index)]
                    s.token_ids.extend(d.token_ids)
                    s.text_len += len(d.text)
                    if d.finish_reason is not None:
                        s.finished = True
                if chunk.choices or err is not None:
                    self._mark_started(group)
                self._queue.put_nowait((group, chunk))
                if chunk.finished or err is not None:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - sorted below
            if not is_retryable(e):
                self._mark_started(group)
                self._queue.put_nowait((group, e))
                return
            failure = f"{type(e).__name__}: {e}"
        finally:
            if stream is not None:
                self._streams.discard(stream)
            if failure is not None and not self.closed:
                self._migrate(group, only, stream, failure)
            self._queue.put_nowait((group, _EOF))

    def _affected(self, group: int, only: int | None) -> list[SequenceProgress]:
        if only is not None:
            return [self.seqs[(group, only)]]
        return [self.seqs[(group, j)] for j in range(self._n)]

    def _migrate(self, group: int, only: int | None, stream: Any, reason: str) -> None:
        if stream is not None:
            try:
                stream.cancel()  # the replica may still be alive (unhealthy): free its engine request
            except Exception:  # noqa: BLE001 - best effort
                pass
        for s in self._affected(group, only):
            if s.finished:
                continue
            if s.engine_deaths >= MAX_ENGINE_DEATHS:
                logger.warning("request %s choice %d: engines died under it %d times; not retried",
                               self._reqs[group].request_id, s.index, s.engine_deaths)
                self._mark_started(group)
                self._queue.put_nowait((group, errors.unavailable(
                    "The engine serving this request failed twice while running it; it is not retried "
                    "again.")))
                continue
            if s.attempts >= self.max_attempts:
                logger.warning("request %s choice %d: no replica left after %d attempts (%s)",
                               self._reqs[group].request_id, s.index, s.attempts, reason)
                self._mark_started(group)
                self._queue.put_nowait((group, errors.unavailable(
                    f"The replica serving this request failed and no other could continue it "
                    f"({s.attempts} attempts).")))
                continue
            s.migrations += 1
            attempt = s.attempts
            s.attempts += 1
            if self._on_migrate is not None:
                self._on_migrate(s, reason)
            logger.info("request %s choice %d: migrating after %d tokens (%s)",
                        self._reqs[group].request_id, s.index, len(s.token_ids), reason)
            req = continuation(self._reqs[group], s, self._n, attempt)
            self._spawn(group, s.index, req, BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])

    # -- consumer -------------------------------------------------------------------
    async def next(self) -> tuple[int, Any] | None:
        """The next (prompt index, chunk); None once every stream has ended.

        Raises the OpenAIError of a failure that could not be migrated.
        """
        while self._open:
            group, item = await self._queue.get()
            if item is _EOF:
                self._open -= 1
                continue
            if isinstance(item, BaseException):
                raise self._map_exception(item)
            return group, item
        return None

    def abort(self, err: OpenAIError) -> None:
        """Make the consumer's next ``next()`` raise ``err``, and stop everything."""
        self._queue.put_nowait((-1, err))
        self._open = max(self._open, 1)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for t in list(self._tasks):
            t.cancel()
        for s in list(self._streams):
            try:
                s.cancel()
            except Exception:  # noqa: BLE001 - cancelling is best effort
                pass


__all__ = ["BACKOFF_S", "MAX_ATTEMPTS", "MigratingJob", "SequenceProgress", "continuation", "is_retryable",
           "unreleased_text"]
