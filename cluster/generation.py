"""One generation request through the ingress: the base both endpoints (completions, chat) share.

:class:`Endpoint` runs the flow; a subclass says how its request becomes
prompts (:meth:`Endpoint.tokenize`) and how a choice looks on the wire
(:meth:`~Endpoint.stream_choice`, :meth:`~Endpoint.final_choice`):

1. validate the OpenAI request (400 naming ``param``), find the model (404),
   check the service limits (400);
2. tokenize with the engine's own tokenizer (fetched once from a replica),
   in a worker thread for long inputs; each prompt against ``max_model_len``
   (400); its prefix block hashes (for prefix-aware routing);
3. admission (``admission.py``): past the model's waiting limits a 429 with
   ``Retry-After`` at once, before any replica sees the request; otherwise
   the request is *accepted*: from here it ends exactly once in the model's
   ledger (``ledger.py``, ``fleetlm_requests_{accepted,finished}_total``);
4. call the replicas (``migration.MigratingJob``: if a replica dies
   mid-generation, each unfinished sequence continues on another replica
   from the tokens already sent); wait for the first chunk before
   answering, so an engine-side rejection (400, 429) is a real status code;
5. stream SSE (``data: {...}``, ``data: [DONE]``) or collect one JSON body;
   both read the deltas through one accumulator (:class:`Choices`).

When the client goes away, Ray Serve cancels the handler; the ``finally``
blocks cancel the replica streams, and the replica aborts the engine request
(its KV blocks return to the pool).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from fleetlm.cluster import errors
from fleetlm.cluster.admission import Ticket
from fleetlm.cluster.backend import ModelBackend, map_exception
from fleetlm.cluster.errors import OpenAIError
from fleetlm.cluster.http_plumbing import SSE_DONE, SSEResponse, error_response, sse
from fleetlm.cluster.ledger import Ending, request_reason
from fleetlm.cluster.messages import ChoiceDelta, GenerateChunk, GenerateRequest, ModelInfo, TokenLogprob
from fleetlm.cluster.migration import MigratingJob
from fleetlm.cluster.protocol import SamplingRequest, chunk_body, new_id, now, parse_request, response_body, usage_dict
from fleetlm.engine.async_engine import TOKENIZE_OFF_LOOP_CHARS


async def off_loop(size: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, in a worker thread when the input is long (tokenizing must not stall the loop)."""
    if size > TOKENIZE_OFF_LOOP_CHARS:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


@dataclass
class Prepared:
    """A validated request, tokenized, ready for the replicas."""

    api_id: str  # the response id; engine request ids are f"{api_id}-{prompt index}"
    req: Any  # a SamplingRequest subclass
    backend: ModelBackend
    gen_reqs: list[GenerateRequest]
    prompt_lens: list[int]
    echo_texts: list[str]  # per prompt ("" unless echo)
    n: int
    want_logprobs: bool
    ticket: Ticket | None = None  # admission (released when the request ends)
    lora: Any = None  # the LoRA adapter the request names (fleetlm.engine.lora.LoRARequest)

    @property
    def model(self) -> str:
        """The served (base) model: ledgers, metrics and admission are per base model."""
        return self.backend.name

    @property
    def response_model(self) -> str:
        """What the response calls the model: the adapter's name when the request named one."""
        return self.lora.lora_name if self.lora is not None else self.backend.name


# --- the accumulator ---------------------------------------------------------------


@dataclass
class ChoiceState:
    """What has arrived for one choice."""

    index: int
    text: str = ""
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    started: bool = False  # a delta has arrived (a completion's echo goes with the first)
    logprob_chars: int = 0  # characters of the tokens given logprobs so far (legacy text_offset)
    prompt_logprobs: list[TokenLogprob] | None = None  # its prompt's, when asked (a completion's echo)


@dataclass(frozen=True)
class Update:
    """One delta applied to its choice: what a streamed event is built from."""

    state: ChoiceState
    delta: ChoiceDelta
    first: bool  # the choice's first delta
    logprob_chars_before: int


class Choices:
    """Every choice of one request as its deltas arrive; one account for streamed and whole responses.

    Choice ``k = prompt index * n + delta.index``. A stream keeps no text or
    logprobs (``keep_output=False``): its events carry them on.
    """

    def __init__(self, num_prompts: int, n: int, keep_output: bool) -> None:
        self.n = n
        self.keep_output = keep_output
        self.states = [ChoiceState(k) for k in range(num_prompts * n)]
        self.cached = [0] * num_prompts
        self.prompt_logprobs: list[list[TokenLogprob] | None] = [None] * num_prompts
        self.completion_tokens = 0

    def add(self, i: int, chunk: GenerateChunk) -> list[Update]:
        self.cached[i] = max(self.cached[i], chunk.num_cached_tokens)
        if chunk.prompt_logprobs is not None and self.prompt_logprobs[i] is None:
            # The first copy counts (a migrated sequence's new replica may send them again).
            self.prompt_logprobs[i] = chunk.prompt_logprobs
        updates = []
        for d in chunk.choices:
            s = self.states[i * self.n + d.index]
            updates.append(Update(s, d, not s.started, s.logprob_chars))
            if not s.started:
                s.prompt_logprobs = self.prompt_logprobs[i]
            s.started = True
            s.num_tokens += len(d.token_ids)
            self.completion_tokens += len(d.token_ids)
            if d.logprobs:
                s.logprob_chars += sum(len(e.token) for e in d.logprobs)
                if self.keep_output:
                    s.logprobs.extend(d.logprobs)
            if self.keep_output:
                s.text += d.text
            if d.finish_reason is not None:
                s.finish_reason, s.stop_reason = d.finish_reason, d.stop_reason
        return updates

    def usage(self, prompt_lens: list[int]) -> dict[str, Any]:
        return usage_dict(sum(prompt_lens), self.completion_tokens, sum(self.cached))

    def reason(self) -> str:
        """How the request ends in the ledger."""
        return request_reason(s.finish_reason for s in self.states)


# --- the endpoint -------------------------------------------------------------------


class Endpoint:
    """One generation endpoint of an ``OpenAIServer`` (``server.py``): the flow of the module docstring."""

    request_cls: type[SamplingRequest]
    object_name: str  # of a whole response
    chunk_object_name: str  # of a streamed event

    def __init__(self, server: Any) -> None:
        self.server = server

    # -- what a subclass defines ------------------------------------------------------
    async def tokenize(self, req: Any, info: ModelInfo) -> tuple[list[list[int]], list[str]]:
        """(token ids, echoed text) of each prompt of the request."""
        raise NotImplementedError

    def opening_choices(self, p: Prepared) -> list[dict[str, Any]]:
        """Streamed events sent before any token (one choice each)."""
        return []

    def stream_choice(self, p: Prepared, u: Update) -> dict[str, Any]:
        raise NotImplementedError

    def final_choice(self, p: Prepared, s: ChoiceState) -> dict[str, Any]:
        raise NotImplementedError

    # -- preparing -----------------------------------------------------------------------
    async def prepare(self, body: Any) -> Prepared:
        server = self.server
        req = parse_request(self.request_cls, body)
        if req.constrained:  # a grammar new to this process can take a while to check: not on the loop
            await asyncio.to_thread(req.check_guided)
        backend, lora = server.resolve(req.model)
        req.check_limits(server.config)
        try:
            info = await backend.info()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            raise map_exception(e) from None
        prompts, echo_texts = await self.tokenize(req, info)
        api_id = new_id(req.id_prefix)
        gen_reqs = []
        params_by_max: dict[int, Any] = {}
        prefix_aware = server.config.router == "prefix_aware"
        for i, ids in enumerate(prompts):
            max_tokens = req.resolve_max_tokens(len(ids), info.max_model_len, server.config.max_tokens_limit)
            params = params_by_max.get(max_tokens)
            if params is None:
                params = params_by_max[max_tokens] = req.sampling_params(max_tokens, info.vocab_size)
            gen_reqs.append(GenerateRequest(
                request_id=f"{api_id}-{i}",
                prompt_token_ids=ids,
                params=params,
                block_hash_ids=_block_hash_ids(ids, info, lora) if prefix_aware else (),
                lora_request=lora,
            ))
        n = req.n or 1
        ticket = None
        admission = server.admission_for(backend, info)
        if admission is not None:
            ticket = admission.admit([len(p) for p in prompts], n, param="prompt" if len(prompts) > 1 else "n")
        return Prepared(api_id, req, backend, gen_reqs, [len(p) for p in prompts], echo_texts, n,
                        req.num_logprobs() is not None, ticket, lora)

    # -- running -----------------------------------------------------------------------------
    async def handle(self, request: Request) -> Response:
        """One generation request. Once accepted (valid and admitted) it ends exactly once
        in the model's ledger: complete, an error, or "abort" when the client leaves."""
        server = self.server
        model = ""
        server.enter()
        handed_off = False
        ending: Ending | None = None
        try:
            server.check_accepting()
            server.authenticate(request)
            body = await server.read_json(request)
            if isinstance(body, dict) and isinstance(body.get("model"), str):
                model = body["model"]
                adapter = server.adapters.get(model)
                model = adapter.base if adapter is not None else model  # errors count under the base model
            p = await self.prepare(body)
            model = p.model
            ending = server.ledger_for(p.model).accept(p.ticket.release if p.ticket is not None else None)
            job = self._start(p)
            try:
                first = await job.next()
                if first is not None:
                    _raise_chunk_error(first[1], p.req)
                if p.req.stream:
                    resp = SSEResponse(self._stream(p, job, first, ending),
                                       on_close=lambda: self._close_stream(job, ending))
                    handed_off = True
                    return resp
                choices = await self._collect(p, job, first)
                ending.end(choices.reason())
                return JSONResponse(response_body(
                    self.object_name, p.api_id, now(), p.response_model,
                    [self.final_choice(p, s) for s in choices.states], choices.usage(p.prompt_lens)))
            finally:
                if not handed_off:
                    server.untrack(job)
        except OpenAIError as e:
            if ending is not None:
                ending.end(e.reason)
            if not e.counted:
                server.count_error(model if model in server.backends else "", e)
            return error_response(e)
        except asyncio.CancelledError:
            if ending is not None:
                ending.end("abort")  # the client went away
            raise
        except Exception:
            if ending is not None:
                ending.end("internal")
            raise
        finally:
            if not handed_off:
                server.exit()

    def _start(self, p: Prepared) -> MigratingJob:
        ledger = self.server.ledger_for(p.model)

        def migrated(seq: Any, reason: str) -> None:
            ledger.migrated += 1

        job = MigratingJob(p.backend.generate, p.gen_reqs, p.n, map_exception, on_migrate=migrated,
                           on_started=p.ticket.started if p.ticket is not None else None)
        self.server.track(job)
        return job

    def _close_stream(self, job: MigratingJob, ending: Ending) -> None:
        """The SSE response is over: sent in full, or the client left (then it ends as "abort")."""
        self.server.untrack(job)
        ending.end("abort")
        self.server.exit()

    async def _collect(self, p: Prepared, job: MigratingJob, first: tuple[int, GenerateChunk] | None) -> Choices:
        choices = Choices(len(p.gen_reqs), p.n, keep_output=True)
        item = first
        while item is not None:
            i, chunk = item
            _raise_chunk_error(chunk, p.req)
            choices.add(i, chunk)
            item = await job.next()
        return choices

    async def _stream(self, p: Prepared, job: MigratingJob, first: tuple[int, GenerateChunk] | None,
                      ending: Ending) -> AsyncIterator[str]:
        created = now()
        inc = p.req.include_usage

        def event(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
            return sse(chunk_body(self.chunk_object_name, p.api_id, created, p.response_model, choices, usage, inc))

        choices = Choices(len(p.gen_reqs), p.n, keep_output=False)
        try:
            for choice in self.opening_choices(p):
                yield event([choice])
            item = first
            while item is not None:
                i, chunk = item
                _raise_chunk_error(chunk, p.req)
                for u in choices.add(i, chunk):
                    choice = self.stream_choice(p, u)
                    if u.delta.finish_reason is not None:
                        choice["stop_reason"] = u.delta.stop_reason
                    yield event([choice])
                item = await job.next()
            ending.end(choices.reason())
            if inc:
                yield event([], choices.usage(p.prompt_lens))
        except OpenAIError as e:
            # The 200 is already sent: end with an error event clients can read.
            ending.end(e.reason)
            if not e.counted:
                self.server.count_error(p.model, e)
            yield errors.sse_error_event(e)
        yield SSE_DONE


def _block_hash_ids(ids: list[int], info: ModelInfo, lora: Any = None) -> tuple[int, ...]:
    """The engine's own block hashes (keyed by the adapter, as its prefix cache is)."""
    from fleetlm.engine.block_hash import block_hash_id, hash_prompt_blocks

    key = lora.cache_key if lora is not None else None
    return tuple(block_hash_id(h) for h in hash_prompt_blocks(ids, info.block_size, key))


def _raise_chunk_error(chunk: GenerateChunk, req: Any) -> None:
    e = chunk.error
    if e is None:
        return
    if e.kind == "queue_full":
        err = errors.queue_full()
    else:
        param = e.param or (req.param_from_message(e.message) if e.kind == "invalid_request" else None)
        err = OpenAIError.of(e.kind, e.message, param)
    err.counted = True  # the replica counted it in its own metrics
    raise err


__all__ = ["ChoiceState", "Choices", "Endpoint", "Prepared", "Update", "off_loop"]
