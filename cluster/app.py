"""The Ray Serve application: ``OpenAIIngress`` (FastAPI) in front of one ``LLMReplica`` deployment per model.

``build_app(args)`` is the application builder (``fleetlm serve`` and
``serve run configs/serve/*.yaml`` both call it): ``args`` is parsed by
``serve_config.parse_app_args`` (unknown keys are an error).

One HTTP request, in the ingress (:class:`OpenAIServer`):

1. refuse while draining (503); authenticate (401, constant-time compare);
   read the body up to ``max_request_body_bytes`` (413, by Content-Length
   and by the bytes actually received); strict UTF-8 and JSON (400);
2. validate the OpenAI request (400 naming ``param``), find the model (404),
   check the service limits (400);
3. apply the chat template and tokenize with the engine's own tokenizer
   (fetched once from a replica), in a worker thread for long inputs; check
   the prompt against ``max_model_len`` (400); compute the prompt's prefix
   block hashes (for prefix-aware routing);
4. admission (``admission.py``): past the model's waiting limits a 429 with
   ``Retry-After`` at once, before any replica sees the request; otherwise
   the request is *accepted*: from here it ends exactly once in the model's
   ledger (``ledger.py``, ``fleetlm_requests_{accepted,finished}_total``);
5. call ``LLMReplica`` streams through a ``DeploymentHandle`` with token ids
   and ``SamplingParams`` (``migration.MigratingJob``: if a replica dies
   mid-generation, each unfinished sequence continues on another replica
   from the tokens already sent); wait for the first chunk before
   answering, so an engine-side rejection (400, 429) is a real status code;
6. stream SSE (``data: {...}``, ``data: [DONE]``) or collect one JSON body.

When the client goes away, Ray Serve cancels the handler; the ``finally``
blocks cancel the replica streams, and the replica aborts the engine request
(its KV blocks return to the pool). ``/openapi.json`` (this deployment's
OpenAPI document, limits included) and ``/debug/invariants`` (every replica's
idle invariants, the ledgers) need the API key like every route but
``/health`` and ``/metrics``.

The HTTP logic lives in :class:`OpenAIServer` over :class:`ModelBackend`
objects, so it runs (and is unit-tested) without Ray: the deployment class
only wires Serve handles into it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleetlm.cluster import errors
from fleetlm.cluster.admission import Admission, AdmissionLimits, Ticket
from fleetlm.cluster.errors import OpenAIError
from fleetlm.cluster.ledger import Ending, Ledger, request_reason
from fleetlm.cluster.metrics import CONTENT_TYPE_LATEST, ServeMetrics, render
from fleetlm.cluster.migration import MigratingJob
from fleetlm.cluster.openai_protocol import (
    ChatCompletionRequest,
    ChoiceState,
    CompletionRequest,
    chat_choice,
    chat_chunk,
    chat_logprobs,
    chat_response,
    check_limits,
    completion_choice,
    completion_chunk,
    completion_logprobs,
    completion_response,
    model_card,
    new_id,
    now,
    param_from_message,
    parse_request,
    resolve_max_tokens,
    sampling_kwargs,
    usage_dict,
)
from fleetlm.cluster.replica import GenerateChunk, GenerateRequest, LLMReplica, ModelInfo, ReplicaHealth
from fleetlm.cluster.serve_config import ModelDeploymentConfig, ServeAppConfig, parse_app_args
from fleetlm.engine.async_engine import TOKENIZE_OFF_LOOP_CHARS

logger = logging.getLogger("fleetlm.ingress")

APP_NAME = "fleetlm"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
CONTROL_TIMEOUT_S = 5.0
# How often the ingress re-counts a model's live replicas (its admission seats).
REPLICA_COUNT_PERIOD_S = 2.0


# --- backends: how the ingress reaches one model's replicas --------------------------


class ModelBackend:
    """One model's replicas behind a Ray Serve ``DeploymentHandle``."""

    def __init__(self, name: str, handle: Any) -> None:
        self.name = name
        self._handle = handle
        self._stream_handle = handle.options(stream=True)
        self._info: asyncio.Future | None = None

    async def info(self) -> ModelInfo:
        """The model's tokenizer and limits, fetched once from a replica."""
        if self._info is None:
            self._info = asyncio.ensure_future(self._handle.model_info.remote())
        try:
            return await asyncio.shield(self._info)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._info = None  # retry on the next request (replica not up yet)
            raise

    def cached_info(self) -> ModelInfo | None:
        if self._info is not None and self._info.done() and not self._info.exception():
            return self._info.result()
        return None

    def generate(self, req: GenerateRequest) -> Any:
        """An async iterator of GenerateChunk with ``cancel()``."""
        return self._stream_handle.generate.remote(req)

    async def _broadcast(self, method: str) -> list[Any]:
        return await self._handle.broadcast(method).results_async(
            timeout_s=CONTROL_TIMEOUT_S, return_exceptions=True)

    async def health(self) -> list[ReplicaHealth]:
        return [r if isinstance(r, ReplicaHealth) else ReplicaHealth("?", False, repr(r))
                for r in await self._broadcast("health")]

    async def metrics(self) -> list[list[Any]]:
        return [r for r in await self._broadcast("metrics_families") if isinstance(r, list)]

    async def invariants(self) -> list[dict[str, Any]]:
        return [r if isinstance(r, dict) else {"replica": "?", "ok": False, "idle": False,
                                               "violations": [f"no answer: {r!r}"]}
                for r in await self._broadcast("invariants")]


def _map_exception(e: BaseException) -> OpenAIError:
    """An exception from a replica stream (not an in-band error) -> OpenAIError."""
    if isinstance(e, OpenAIError):
        return e
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    if isinstance(e, serve_exc.BackPressureError):
        return errors.queue_full()
    if isinstance(e, (serve_exc.DeploymentUnavailableError, ray_exc.RayActorError,
                      getattr(ray_exc, "ActorUnavailableError", ray_exc.RayActorError))):
        return errors.unavailable("No replica of the model is available; retry later.")
    logger.error("replica stream failed: %r", e)
    return errors.internal(f"Generation failed: {type(e).__name__}.")


class _SSEResponse(StreamingResponse):
    """StreamingResponse that always runs ``on_close`` (even if never iterated)."""

    def __init__(self, body: Any, on_close: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


@dataclass
class _Prepared:
    """A validated request, tokenized, ready for the replicas."""

    kind: str  # "completion" | "chat"
    api_id: str  # the response id; engine request ids are f"{api_id}-{prompt index}"
    req: Any
    model: str
    backend: ModelBackend
    gen_reqs: list[GenerateRequest]
    prompt_lens: list[int]
    echo_texts: list[str]  # per prompt ("" unless echo)
    n: int
    want_logprobs: bool
    ticket: Ticket | None = None  # admission (released when the request ends)


# --- the HTTP server ---------------------------------------------------------------


class OpenAIServer:
    """The OpenAI HTTP API over ``ModelBackend`` objects (no Ray in here)."""

    def __init__(self, config: ServeAppConfig, backends: dict[str, ModelBackend], replica: str = "ingress") -> None:
        self.config = config
        self.backends = backends
        self.replica = replica
        self.draining = False
        self.inflight = 0
        self._jobs: set[MigratingJob] = set()
        self._metrics: dict[str, ServeMetrics] = {}
        self._ledgers: dict[str, Ledger] = {}
        self._admission: dict[str, Admission] = {}
        self._replica_count_due: dict[str, float] = {}
        self._created = now()
        self._api_key = config.api_key.encode() if config.api_key else None

    # -- lifecycle (called by the CLI through the ingress deployment) -----------
    def start_draining(self) -> int:
        self.draining = True
        return self.inflight

    def abort_inflight(self) -> int:
        jobs = list(self._jobs)
        for job in jobs:
            job.abort(errors.draining())
        return len(jobs)

    def _enter(self) -> None:
        self.inflight += 1

    def _exit(self) -> None:
        self.inflight -= 1

    # -- checks ------------------------------------------------------------------
    def _metrics_for(self, model: str) -> ServeMetrics:
        m = self._metrics.get(model)
        if m is None:
            m = self._metrics[model] = ServeMetrics(model, self.replica)
        return m

    def count_error(self, model: str, err: OpenAIError) -> None:
        self._metrics_for(model).request_error(err.reason)

    def _ledger_for(self, model: str) -> Ledger:
        led = self._ledgers.get(model)
        if led is None:
            led = self._ledgers[model] = Ledger(self._metrics_for(model))
        return led

    def _admission_for(self, backend: ModelBackend, info: ModelInfo) -> Admission | None:
        """The model's admission control (None when its limits are off); seats re-counted periodically."""
        a = self._admission.get(backend.name)
        if a is None:
            try:
                m = self.config.model(backend.name)
            except KeyError:  # a backend without a config entry (tests): no admission control
                return None
            limits = AdmissionLimits(m.max_waiting_requests, m.max_waiting_tokens)
            if not limits.enabled:
                return None
            start = m.num_replicas if m.autoscaling is None else max(1, m.autoscaling.min_replicas)
            most = m.num_replicas if m.autoscaling is None else m.autoscaling.max_replicas
            a = self._admission[backend.name] = Admission(limits, info.max_num_seqs, start, most)
        loop = asyncio.get_running_loop()
        if loop.time() >= self._replica_count_due.get(backend.name, 0.0):
            self._replica_count_due[backend.name] = loop.time() + REPLICA_COUNT_PERIOD_S
            asyncio.ensure_future(self._count_replicas(backend, a))
        return a

    @staticmethod
    async def _count_replicas(backend: ModelBackend, a: Admission) -> None:
        """Seats follow the live replicas (one dead: fewer admitted; none yet: assume one is coming)."""
        try:
            healthy = sum(1 for h in await backend.health() if h.healthy)
        except Exception:  # noqa: BLE001 - keep the last count
            return
        a.set_replicas(max(1, healthy))

    def check_accepting(self) -> None:
        if self.draining:
            raise errors.draining()

    def authenticate(self, request: Request) -> None:
        if self._api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode("latin-1", errors="replace") if scheme.lower() == "bearer" else b""
        # Constant time in the key's content: no early exit on the first differing byte.
        if not hmac.compare_digest(given, self._api_key):
            raise errors.unauthorized("Missing API key." if not header else "Invalid API key.")

    async def read_json(self, request: Request) -> Any:
        ctype = request.headers.get("content-type")
        if ctype is not None:
            media = ctype.split(";", 1)[0].strip().lower()
            if media and media != "application/json" and not media.endswith("+json"):
                raise errors.unsupported_media_type(media)
        limit = self.config.max_request_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise errors.bad_request("Invalid Content-Length header.") from None
            if size > limit:
                raise errors.request_too_large(limit)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise errors.request_too_large(limit)
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as e:
            raise errors.bad_request(f"The request body is not valid UTF-8 (byte {e.start}).") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise errors.bad_request(f"The request body is not valid JSON: {e.msg} at position {e.pos}.") from None
        except RecursionError:
            raise errors.bad_request("The request body is nested too deeply.") from None
        except ValueError as e:  # e.g. an integer literal of thousands of digits
            raise errors.bad_request(f"The request body is not valid JSON: {e}") from None
        if _SURROGATE_ESCAPE.search(text):
            # A lone "\ud800" escape decodes to a string no encoder accepts: refuse it
            # here rather than fail (500) when tokenizing or echoing it.
            try:
                json.dumps(data, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise errors.bad_request("The request body contains an unpaired UTF-16 surrogate escape.") from None
        return data

    def backend(self, model: str | None) -> ModelBackend:
        if model is None:
            if len(self.backends) == 1:
                return next(iter(self.backends.values()))
            raise errors.bad_request("The model parameter is required.", "model")
        b = self.backends.get(model)
        if b is None:
            raise errors.model_not_found(model)
        return b

    # -- preparing a request -------------------------------------------------------
    async def _off_loop(self, size: int, fn: Callable[..., Any], *args: Any) -> Any:
        if size > TOKENIZE_OFF_LOOP_CHARS:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    async def prepare(self, kind: str, body: Any) -> _Prepared:
        cls = CompletionRequest if kind == "completion" else ChatCompletionRequest
        req = parse_request(cls, body)
        backend = self.backend(req.model)
        check_limits(req, self.config)
        if kind == "completion" and req.echo and req.logprobs is not None:
            raise errors.bad_request("echo together with logprobs is not supported "
                                     "(prompt logprobs are not computed).", "echo")
        try:
            info = await backend.info()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _map_exception(e) from None
        tok = info.tokenizer
        prompts: list[list[int]] = []
        echo_texts: list[str] = []
        if kind == "chat":
            from fleetlm.engine.llm import apply_chat_template

            messages = req.template_messages()
            size = sum(len(m["content"]) for m in messages)
            try:
                ids = await self._off_loop(size, apply_chat_template, tok, messages, True)
            except Exception as e:  # noqa: BLE001 - a template or tokenizer refusing the input
                raise errors.bad_request(f"The messages could not be tokenized: {e}", "messages") from None
            prompts.append(list(ids))
            echo_texts.append("")
        else:
            for i, p in enumerate(req.prompts()):
                if isinstance(p, str):
                    try:
                        ids = await self._off_loop(len(p), _encode, tok, p)
                    except Exception as e:  # noqa: BLE001
                        raise errors.bad_request(f"The prompt could not be tokenized: {e}", "prompt") from None
                    text = p
                else:
                    bad = next((t for t in p if not 0 <= t < info.vocab_size), None)
                    if bad is not None:
                        raise errors.bad_request(
                            f"Token id {bad} is outside the vocabulary [0, {info.vocab_size}).", "prompt")
                    ids = p
                    text = (await self._off_loop(len(p) * 4, tok.decode, p)) if req.echo else ""
                if not ids:
                    raise errors.bad_request("The prompt has no tokens.", "prompt")
                prompts.append(ids)
                echo_texts.append(text if req.echo else "")
        api_id = new_id("cmpl" if kind == "completion" else "chatcmpl")
        gen_reqs = []
        params_by_max: dict[int, Any] = {}
        for i, ids in enumerate(prompts):
            max_tokens = resolve_max_tokens(req, len(ids), info.max_model_len, self.config.max_tokens_limit)
            params = params_by_max.get(max_tokens)
            if params is None:
                params = params_by_max[max_tokens] = self._sampling_params(req, max_tokens, info.vocab_size)
            gen_reqs.append(GenerateRequest(
                request_id=f"{api_id}-{i}",
                prompt_token_ids=ids,
                params=params,
                block_hash_ids=self._block_hash_ids(ids, info) if self.config.router == "prefix_aware" else (),
            ))
        want = (req.logprobs is not None) if kind == "completion" else bool(req.logprobs)
        n = req.n or 1
        ticket = None
        admission = self._admission_for(backend, info)
        if admission is not None:
            ticket = admission.admit([len(p) for p in prompts], n, param="prompt" if len(prompts) > 1 else "n")
        return _Prepared(kind, api_id, req, backend.name, backend, gen_reqs, [len(p) for p in prompts],
                         echo_texts, n, want, ticket)

    def _sampling_params(self, req: Any, max_tokens: int, vocab_size: int) -> Any:
        from fleetlm.engine.sampling_params import SamplingParams

        kw = sampling_kwargs(req, max_tokens)
        if kw.get("top_k", 0) >= vocab_size:
            # Keeping every token is no top-k at all; and a k past int32 must not
            # reach the sampler's tensors (it killed the engine loop).
            kw["top_k"] = -1
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as e:
            raise errors.bad_request(str(e), param_from_message(str(e), req)) from None

    @staticmethod
    def _block_hash_ids(ids: list[int], info: ModelInfo) -> tuple[int, ...]:
        from fleetlm.engine.block_hash import block_hash_id, hash_prompt_blocks

        return tuple(block_hash_id(h) for h in hash_prompt_blocks(ids, info.block_size))

    # -- running a request ---------------------------------------------------------
    def _start(self, p: _Prepared) -> MigratingJob:
        ledger = self._ledger_for(p.model)

        def migrated(seq: Any, reason: str) -> None:
            ledger.migrated += 1

        job = MigratingJob(p.backend.generate, p.gen_reqs, p.n, _map_exception, on_migrate=migrated,
                           on_started=p.ticket.started if p.ticket is not None else None)
        self._jobs.add(job)
        return job

    def _finish(self, job: MigratingJob) -> None:
        job.close()
        self._jobs.discard(job)

    def _close_stream(self, job: MigratingJob, ending: Ending) -> None:
        """The SSE response is over: sent in full, or the client left (then it ends as "abort")."""
        self._finish(job)
        ending.end("abort")
        self._exit()

    @staticmethod
    def _raise_chunk_error(chunk: GenerateChunk, req: Any) -> None:
        e = chunk.error
        if e is None:
            return
        if e.kind == "queue_full":
            err = errors.queue_full()
        else:
            param = e.param or (param_from_message(e.message, req) if e.kind == "invalid_request" else None)
            err = OpenAIError.of(e.kind, e.message, param)
        err.counted = True  # the replica counted it in its own metrics
        raise err

    async def handle(self, kind: str, request: Request) -> Response:
        """One generation request. Once accepted (valid and admitted) it ends exactly once
        in the model's ledger: complete, an error, or "abort" when the client leaves."""
        model = ""
        self._enter()
        handed_off = False
        ending: Ending | None = None
        try:
            self.check_accepting()
            self.authenticate(request)
            body = await self.read_json(request)
            if isinstance(body, dict) and isinstance(body.get("model"), str):
                model = body["model"]
            p = await self.prepare(kind, body)
            model = p.model
            ending = self._ledger_for(p.model).accept(p.ticket.release if p.ticket is not None else None)
            job = self._start(p)
            try:
                first = await job.next()
                if first is not None:
                    self._raise_chunk_error(first[1], p.req)
                if p.req.stream:
                    body_iter = self._stream(p, job, first, ending)
                    resp = _SSEResponse(body_iter, on_close=lambda: self._close_stream(job, ending))
                    handed_off = True
                    return resp
                result = await self._collect(p, job, first)
                ending.end(request_reason(c["finish_reason"] for c in result["choices"]))
                return JSONResponse(result)
            finally:
                if not handed_off:
                    self._finish(job)
        except OpenAIError as e:
            if ending is not None:
                ending.end(e.reason)
            if not e.counted:
                self.count_error(model if model in self.backends else "", e)
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
                self._exit()

    async def _collect(self, p: _Prepared, job: MigratingJob, first: tuple[int, GenerateChunk] | None) -> dict[str, Any]:
        n = p.n
        states = {i * n + j: ChoiceState(i * n + j) for i in range(len(p.gen_reqs)) for j in range(n)}
        cached = [0] * len(p.gen_reqs)
        item = first
        while item is not None:
            i, chunk = item
            self._raise_chunk_error(chunk, p.req)
            cached[i] = max(cached[i], chunk.num_cached_tokens)
            for d in chunk.choices:
                s = states[i * n + d.index]
                s.text += d.text
                s.num_tokens += len(d.token_ids)
                if d.logprobs:
                    s.logprobs.extend(d.logprobs)
                if d.finish_reason is not None:
                    s.finish_reason, s.stop_reason = d.finish_reason, d.stop_reason
            item = await job.next()
        usage = usage_dict(sum(p.prompt_lens), sum(s.num_tokens for s in states.values()), sum(cached))
        ordered = [states[k] for k in sorted(states)]
        created = now()
        if p.kind == "completion":
            choices = [completion_choice(s, p.want_logprobs, p.echo_texts[s.index // n]) for s in ordered]
            return completion_response(p.api_id, created, p.model, choices, usage)
        choices = [chat_choice(s, p.want_logprobs) for s in ordered]
        return chat_response(p.api_id, created, p.model, choices, usage)

    async def _stream(self, p: _Prepared, job: MigratingJob, first: tuple[int, GenerateChunk] | None,
                      ending: Ending):
        n = p.n
        api_id = p.api_id
        created = now()
        inc = p.req.include_usage
        is_chat = p.kind == "chat"
        make = chat_chunk if is_chat else completion_chunk
        cached = [0] * len(p.gen_reqs)
        completion_tokens = 0
        offsets: dict[int, int] = {}
        started: set[int] = set()
        reasons: dict[int, str | None] = {}
        try:
            if is_chat:
                for k in range(len(p.gen_reqs) * n):
                    yield _sse(make(api_id, created, p.model, [{
                        "index": k, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}], None, inc))
            item = first
            while item is not None:
                i, chunk = item
                self._raise_chunk_error(chunk, p.req)
                cached[i] = max(cached[i], chunk.num_cached_tokens)
                for d in chunk.choices:
                    k = i * n + d.index
                    completion_tokens += len(d.token_ids)
                    if is_chat:
                        delta = {"content": d.text} if d.text else {}
                        lp = chat_logprobs(d.logprobs) if p.want_logprobs and d.logprobs is not None else None
                        choice = {"index": k, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}
                    else:
                        prefix = ""
                        if k not in started:
                            started.add(k)
                            prefix = p.echo_texts[i]
                            offsets[k] = len(prefix)
                        lp = None
                        if p.want_logprobs and d.logprobs is not None:
                            lp = completion_logprobs(d.logprobs, offsets.get(k, 0))
                            offsets[k] = offsets.get(k, 0) + sum(len(e.token) for e in d.logprobs)
                        choice = {"index": k, "text": prefix + d.text, "logprobs": lp,
                                  "finish_reason": d.finish_reason}
                    if d.finish_reason is not None:
                        choice["stop_reason"] = d.stop_reason
                        reasons[k] = d.finish_reason
                    yield _sse(make(api_id, created, p.model, [choice], None, inc))
                item = await job.next()
            ending.end(request_reason(reasons.get(k) for k in range(len(p.gen_reqs) * n)))
            if inc:
                usage = usage_dict(sum(p.prompt_lens), completion_tokens, sum(cached))
                yield _sse(make(api_id, created, p.model, [], usage, True))
        except OpenAIError as e:
            # The 200 is already sent: end with an error event clients can read.
            ending.end(e.reason)
            if not e.counted:
                self.count_error(p.model, e)
            yield errors.sse_error_event(e)
        yield SSE_DONE

    # -- other endpoints -------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        try:
            self.authenticate(request)
        except OpenAIError as e:
            return error_response(e)
        infos = await asyncio.gather(*(self._info_soon(b) for b in self.backends.values()))
        data = [model_card(name, self._created, info.max_model_len if info else None)
                for name, info in zip(self.backends, infos)]
        return JSONResponse({"object": "list", "data": data})

    @staticmethod
    async def _info_soon(backend: ModelBackend) -> ModelInfo | None:
        """The model's info if a replica gives it within ``CONTROL_TIMEOUT_S`` (a model scaled
        to zero, or still starting, is listed without ``max_model_len``)."""
        try:
            return await asyncio.wait_for(backend.info(), CONTROL_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001
            return backend.cached_info()

    async def version(self, request: Request) -> Response:
        try:
            self.authenticate(request)
        except OpenAIError as e:
            return error_response(e)
        from fleetlm import __version__

        return JSONResponse({"version": __version__})

    async def health(self) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        results = await asyncio.gather(*(b.health() for b in self.backends.values()), return_exceptions=True)
        report: dict[str, Any] = {}
        ok = True
        for name, r in zip(self.backends, results):
            if isinstance(r, BaseException) or not r:
                ok = False
                report[name] = [{"healthy": False, "message": repr(r) if isinstance(r, BaseException) else "no replicas"}]
                continue
            report[name] = [{"replica": h.replica, "healthy": h.healthy, "message": h.message} for h in r]
            ok = ok and all(h.healthy for h in r)
        return JSONResponse({"status": "ok" if ok else "unhealthy", "models": report},
                            status_code=200 if ok else 503)

    async def openapi(self, request: Request) -> Response:
        """The OpenAPI document of this deployment (cluster/openapi.py), limits included."""
        from fleetlm.cluster.openapi import openapi_document

        try:
            self.authenticate(request)
        except OpenAIError as e:
            return error_response(e)
        vocab = {info.vocab_size for b in self.backends.values() if (info := b.cached_info()) is not None}
        return JSONResponse(openapi_document(
            self.config, vocab_size=vocab.pop() if len(vocab) == 1 and len(self.backends) == 1 else None,
            extra_paths=DEBUG_PATHS))

    async def debug_invariants(self, request: Request) -> Response:
        """Per model: every replica's engine invariants, the ingress ledger and admission.

        ``ok`` is true when the whole app is idle and clean: every replica idle
        with its invariants holding, every ledger balanced (accepted ==
        finished, nothing in flight).
        """
        try:
            self.authenticate(request)
        except OpenAIError as e:
            return error_response(e)
        results = await asyncio.gather(*(b.invariants() for b in self.backends.values()), return_exceptions=True)
        models: dict[str, Any] = {}
        ledgers: dict[str, Any] = {}
        ok = True
        for name, r in zip(self.backends, results):
            reps = [{"replica": "?", "ok": False, "idle": False, "violations": [repr(r)]}] \
                if isinstance(r, BaseException) else r
            a = self._admission.get(name)
            models[name] = {"replicas": reps, "admission": a.snapshot() if a is not None else None}
            led = self._ledger_for(name).snapshot()
            ledgers[name] = led
            ok = ok and bool(reps) and all(x.get("ok") for x in reps) and led["balanced"]
        return JSONResponse({"ok": ok, "ingress": self.replica, "inflight_http": self.inflight,
                             "models": models, "ledger": ledgers})

    async def metrics(self) -> Response:
        results = await asyncio.gather(*(b.metrics() for b in self.backends.values()), return_exceptions=True)
        groups = [fams for r in results if isinstance(r, list) for fams in r]
        groups.extend(m.collect() for m in self._metrics.values())
        return Response(render(groups), media_type=CONTENT_TYPE_LATEST)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # As LLMEngine.tokenize: no special tokens added to raw completion prompts.
    return list(tokenizer.encode(text, add_special_tokens=False))


DEBUG_PATHS: dict[str, Any] = {
    "/debug/invariants": {"get": {
        "summary": "Idle invariants of every replica's engine, the ingress ledger and admission",
        "responses": {"200": {"description": "The report; ok is true when idle and clean.",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      "401": {"description": "Missing or invalid API key.",
                              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
    }},
    "/openapi.json": {"get": {
        "summary": "This document",
        "responses": {"200": {"description": "OpenAPI 3.1.",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      "401": {"description": "Missing or invalid API key.",
                              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
    }},
}


def error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status_code, headers=e.headers or None)


def create_app(server: OpenAIServer) -> FastAPI:
    """The FastAPI app of one ingress replica, routes bound to ``server``."""
    app = FastAPI(title="FleetLM", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.handle("completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.handle("chat", request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await server.models(request)

    @app.get("/health")
    async def health() -> Response:
        return await server.health()

    @app.get("/ping")
    async def ping() -> Response:
        # vLLM's (and SageMaker's) liveness route: the same answer as /health.
        return await server.health()

    @app.get("/version")
    async def version(request: Request) -> Response:
        return await server.version(request)

    @app.get("/metrics")
    async def metrics() -> Response:
        return await server.metrics()

    @app.get("/openapi.json")
    async def openapi(request: Request) -> Response:
        return await server.openapi(request)

    @app.get("/debug/invariants")
    async def debug_invariants(request: Request) -> Response:
        return await server.debug_invariants(request)

    from fleetlm.cluster.dashboard import add_dashboard_routes

    add_dashboard_routes(app, server)  # /dashboard: the live page (cluster/dashboard.py)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        if kind is not None:
            return error_response(OpenAIError.of(kind, f"{request.method} {request.url.path}: {exc.detail}"))
        return error_response(OpenAIError(exc.status_code, str(exc.detail), "invalid_request_error"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(errors.internal())

    return app


# --- Ray Serve deployments ----------------------------------------------------------


def _serve_replica_id() -> str:
    from fleetlm.cluster.replica import _replica_id

    return _replica_id()


class OpenAIIngress:
    """The ingress deployment: an ``OpenAIServer`` over the models' replica handles."""

    def __init__(self, config: ServeAppConfig, replicas: dict[str, Any]) -> None:
        from fleetlm.cluster.access_log import quiet_probe_access_logs

        quiet_probe_access_logs()
        backends = {name: ModelBackend(name, h) for name, h in replicas.items()}
        self.server = OpenAIServer(config, backends, replica=_serve_replica_id())

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.server)

    # Control plane, called by `fleetlm serve` through the app handle.
    def start_draining(self) -> int:
        return self.server.start_draining()

    def num_inflight(self) -> int:
        return self.server.inflight

    def abort_inflight(self) -> int:
        return self.server.abort_inflight()


def _deployment_name(model: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
    return f"LLMReplica-{safe}"


def _resolve_device(device: str) -> str:
    """"auto" -> "cuda" when the cluster has GPUs (build_app runs on a connected driver)."""
    if device != "auto":
        return device
    try:
        import ray

        if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
            return "cuda"
    except Exception:  # noqa: BLE001 - not connected: plan for CPU
        pass
    return "cpu"


def replica_deployment_options(m: ModelDeploymentConfig, config: ServeAppConfig) -> dict[str, Any]:
    """Ray Serve options of one model's ``LLMReplica`` deployment."""
    opts: dict[str, Any] = {
        "name": _deployment_name(m.name),
        # Admission is the engine's (429 past max_queued_requests): Serve must
        # not queue in front of it, so its per-replica cap is never the limit.
        "max_ongoing_requests": (m.max_num_seqs or 256) + config.max_queued_requests + 64,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_wait_loop_s": 0.5,
        "graceful_shutdown_timeout_s": 10.0,
    }
    if m.autoscaling is not None:
        from fleetlm.cluster.autoscaling import serve_autoscaling_config

        opts["autoscaling_config"] = serve_autoscaling_config(m.autoscaling)
    else:
        opts["num_replicas"] = m.num_replicas
    if config.router == "prefix_aware":
        from fleetlm.cluster.router import request_router_options

        opts.update(request_router_options())
    device = _resolve_device(m.device)
    if m.world_size == 1:
        opts["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 1 if device == "cuda" else 0}
    else:
        # One placement group per replica: a bundle for the replica actor
        # (engine and scheduler), then one per pipeline stage holding its TP
        # workers (parallel/placement.py); the replica's RayWorkerGroup places
        # its worker actors in this group.
        from fleetlm.parallel.placement import PlacementSpec, stage_bundles

        spec = PlacementSpec.for_device(device)
        opts["ray_actor_options"] = {"num_cpus": 1}
        opts["placement_group_bundles"] = [{"CPU": 1}] + stage_bundles(
            spec, m.tensor_parallel_size, m.pipeline_parallel_size)
        opts["placement_group_strategy"] = spec.strategy
    return opts


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Ray Serve application builder: ``fleetlm.cluster.app:build_app``."""
    from ray import serve

    config = args if isinstance(args, ServeAppConfig) else parse_app_args(args)
    replica_cls = serve.deployment(LLMReplica)
    replicas = {}
    for m in config.models:
        dep = replica_cls.options(**replica_deployment_options(m, config))
        replicas[m.name] = dep.bind(m, config.max_queued_requests, config.max_n, config.max_logprobs)
    ingress_cls = serve.deployment(
        serve.ingress()(OpenAIIngress),
        name="OpenAIIngress",
        num_replicas=1,
        # Every open HTTP request (a stream lasts seconds) is one ongoing request.
        max_ongoing_requests=100_000,
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=10.0,
    )
    return ingress_cls.bind(config, replicas)


__all__ = [
    "APP_NAME",
    "ModelBackend",
    "OpenAIIngress",
    "OpenAIServer",
    "build_app",
    "create_app",
    "replica_deployment_options",
]
