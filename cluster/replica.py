"""``LLMReplica``: one Ray Serve replica of one model, wrapping an ``AsyncEngine``.

The ingress has already tokenized and validated the request; the replica gets
token ids and ``SamplingParams`` (``messages.GenerateRequest``) and streams back
small ``messages.GenerateChunk`` messages: per choice, only what is new since the
previous chunk (``deltas.DeltaTracker``), never the cumulative output.

Whatever ends the stream early (the ingress cancels it because its client
went away, an error, shutdown) aborts the engine request in ``finally``, so
the request's KV blocks return to the pool at once.

Errors a client caused (ValueError from the engine) and overload (engine
queue over ``max_queued_requests``) come back as an in-band ``error`` chunk
with the HTTP kind, not as exceptions: exceptions crossing Ray arrive
wrapped, and the ingress must tell a 400 from a 429 from a dead engine.

The replica also answers the control plane: ``model_info`` (tokenizer and
limits for the ingress), ``health`` and ``metrics`` (called on every replica
through ``DeploymentHandle.broadcast``), ``check_health`` (Ray Serve's own
health check: a dead engine gets the replica restarted) and
``record_routing_stats`` (queue depth and cached prefix blocks, for routers).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from fleetlm.cluster.deltas import DeltaTracker
from fleetlm.cluster.messages import GenerateChunk, GenerateRequest, ModelInfo, ReplicaError, ReplicaHealth
from fleetlm.cluster.metrics import ServeMetrics
from fleetlm.cluster.migration import unreleased_text
from fleetlm.cluster.serve_config import ModelDeploymentConfig

logger = logging.getLogger("fleetlm.replica")


def engine_args_kwargs(model: ModelDeploymentConfig, max_n: int, max_logprobs: int) -> dict[str, Any]:
    """``EngineArgs`` keyword arguments of one served model: every engine setting of its config."""
    return {**model.engine_kwargs(), "served_model_name": model.name, "max_n": max_n, "max_logprobs": max_logprobs}


def replica_id() -> str:
    """This Serve replica's id (\"local\" outside Serve)."""
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        rid = ctx.replica_id
        return getattr(rid, "unique_id", None) or str(rid)
    except Exception:  # noqa: BLE001 - outside Serve (tests): a stable placeholder
        return "local"


# --- the replica ------------------------------------------------------------------


def stream_interval_s(open_streams: int, chunks_per_s: float, most_s: float) -> float:
    """Least time between two chunks of one stream when ``open_streams`` are open (0 for one)."""
    return 0.0 if open_streams <= 1 else min(most_s, open_streams / chunks_per_s)


# Prefill times kept (a new replica's first requests, and the latest ones) for /debug/invariants.
PREFILL_SAMPLES = 16

# A replica whose engine died ends its own process this long after noticing,
# time enough for its open streams to carry their "retry elsewhere" chunks.
FAIL_FAST_EXIT_S = 0.5


def process_age_s() -> float | None:
    """Seconds since this process started (Linux; None elsewhere): a replica's Ray actor start and imports."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


class LLMReplica:
    """One model's engine behind Ray Serve (decorated into a deployment by ``app.build_app``)."""

    def __init__(
        self,
        model: ModelDeploymentConfig,
        max_queued_requests: int,
        max_n: int = 16,
        max_logprobs: int = 20,
        engine: Any = None,
    ) -> None:
        t_init = time.monotonic()
        before_init = process_age_s()
        # Only a replica that built its own engine may end its process (never a test's).
        self._owns_engine = engine is None
        if self._owns_engine:
            from fleetlm.cluster.access_log import quiet_probe_access_logs

            quiet_probe_access_logs()
        self._exiting = False
        self._engine_dead = False  # seen dead once: it never comes back
        if engine is None:
            from fleetlm.engine.args import EngineArgs
            from fleetlm.engine.async_engine import AsyncEngine

            engine = AsyncEngine.from_engine_args(
                EngineArgs.from_kwargs(**engine_args_kwargs(model, max_n, max_logprobs)))
        self.engine = engine
        self.name = model.name
        self._load_lora_modules(model)
        self.max_queued_requests = max_queued_requests
        self.stream_chunks_per_s = model.stream_chunks_per_s
        self.stream_max_interval_s = model.stream_max_interval_s
        self.tool_call_parser, self.enable_auto_tool_choice = model.tool_call_parser, bool(model.enable_auto_tool_choice)
        self.replica = replica_id()
        self.metrics = ServeMetrics(self.name, self.replica, self.engine.stats)
        self.max_num_seqs = self.engine.config.scheduler.max_num_seqs
        # Requests handed to the engine that have no output yet (waiting, in
        # the engine's inbox, or running their prefill). A burst of arrivals
        # sits in the inbox before the scheduler counts them as waiting; this
        # counter sees them at once.
        self._not_started = 0
        # Streams open on this replica: with many, each chunk's trip through
        # Ray Serve (replica -> ingress -> proxy) costs more than a decode
        # step, so deltas are coalesced (outputs are cumulative, nothing is
        # lost): a stream's chunks are at least ``stream_interval_s`` apart
        # (about ``stream_chunks_per_s`` chunks a second over all streams),
        # except its first and its last, which go at once. One stream gets
        # every token at once.
        self._open_streams = 0
        # Seconds from a request's first step to its first token (its prefill, without
        # the queue before it): a replica's first requests next to its latest ones.
        self._first_prefills: list[float] = []
        self._recent_prefills: deque[float] = deque(maxlen=PREFILL_SAMPLES)
        # Start-up phases: the process before this constructor, the engine's, the constructor's.
        self.startup_seconds = {**({"process": before_init} if before_init is not None else {}),
                                **getattr(self.engine, "startup_seconds", {}), "replica": time.monotonic() - t_init}
        self.metrics.startup(self.startup_seconds)
        logger.info("replica %s of %s ready: %s", self.replica, self.name,
                    ", ".join(f"{k} {v:.2f} s" for k, v in self.startup_seconds.items()))

    def num_queued(self) -> int:
        """Requests waiting for a seat in the running batch (what max_queued_requests bounds)."""
        s = self.engine.stats()
        free_seats = max(0, self.max_num_seqs - s.num_running)
        # Requests not yet in the running batch: the engine's count (inbox
        # included), or those without output minus the running ones (some of
        # which are still in their prefill: counting them again would refuse a
        # burst that exactly fills seats + queue). Those a free seat takes at
        # the next step are not queued (the ingress's admission counts the
        # same way: seats + waiting).
        waiting = max(s.num_waiting, self._not_started - s.num_running)
        return max(0, waiting - free_seats)

    # -- data plane ------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Stream the request's deltas; the last chunk has ``finished=True`` (or ``error``).

        A migrated sequence (``resume_token_ids``) continues after the tokens
        the client already has: the engine resumes it from them
        (``prior_output_token_ids``: they count toward max_tokens, min_tokens,
        penalties and the seeded draws, exactly as if it had produced them),
        and the first chunk also carries any text of them the client has not
        received yet (held back as a possible stop string).
        """
        if self._engine_dead:
            # Serve may route here until this replica is gone: send it elsewhere at once.
            yield GenerateChunk(error=ReplicaError("unavailable", "This replica's engine is dead.",
                                                   retryable=True, dead_on_arrival=True))
            return
        if req.attempt == 0 and self.num_queued() >= self.max_queued_requests:
            self.metrics.request_error("queue_full")
            yield GenerateChunk(error=ReplicaError(
                "queue_full", f"{self.max_queued_requests} requests are already waiting."))
            return
        tracker = DeltaTracker(req.params.logprobs, req.params.prompt_logprobs, self._decode_token)
        finished = False
        accepted = False
        last_token_time: float | None = None
        self._not_started += 1
        self._open_streams += 1
        try:
            pending_text = ""
            coalesce = lambda: stream_interval_s(  # noqa: E731
                self._open_streams, self.stream_chunks_per_s, self.stream_max_interval_s)
            lora = {"lora_request": req.lora_request} if req.lora_request is not None else {}
            if req.resume_token_ids:
                pending_text = unreleased_text(self.engine.tokenizer, req.prompt_token_ids, req.params,
                                               req.resume_token_ids, req.resume_text_len)
                outputs = self.engine.generate(req.prompt_token_ids, req.params, req.request_id,
                                               prior_output_token_ids=list(req.resume_token_ids),
                                               coalesce_s=coalesce, **lora)
            else:
                outputs = self.engine.generate(req.prompt_token_ids, req.params, req.request_id,
                                               coalesce_s=coalesce, **lora)
            async for out in outputs:
                now = time.monotonic()
                if not accepted:
                    accepted = True
                    self._not_started -= 1
                    self.metrics.request_accepted(len(out.prompt_token_ids))
                chunk, new_tokens = tracker.update(out)
                if req.resume_token_ids:
                    # Cached tokens of the original prompt only (usage counts those).
                    chunk.num_cached_tokens = min(chunk.num_cached_tokens, len(req.prompt_token_ids))
                    if pending_text and chunk.choices:
                        chunk.choices[0].text = pending_text + chunk.choices[0].text
                        pending_text = ""
                if new_tokens:
                    m = out.metrics
                    if req.resume_token_ids:
                        self.metrics.tokens_generated(new_tokens, None)
                    elif last_token_time is None:
                        if m is not None and m.first_token_time is not None:
                            self.metrics.first_token(m.first_token_time - m.arrival_time)
                            if m.first_scheduled_time is not None:
                                self._record_prefill(m.first_token_time - m.first_scheduled_time)
                        # The first token has no "time per output token".
                        self.metrics.tokens_generated(1, None)
                        if new_tokens > 1:
                            per = (now - (m.first_token_time or now)) / (new_tokens - 1) if m else 0.0
                            self.metrics.tokens_generated(new_tokens - 1, max(0.0, per))
                    else:
                        self.metrics.tokens_generated(new_tokens, (now - last_token_time) / new_tokens)
                    last_token_time = now
                if out.finished:
                    finished = True
                    m = out.metrics
                    e2e = (m.finished_time - m.arrival_time) if m and m.finished_time else None
                    reasons = [c.finish_reason for c in out.outputs]
                    bad = next((r for r in reasons if r not in ("stop", "length")), None)
                    self.metrics.request_finished(bad or reasons[0], e2e)
                    if req.lora_request is not None:
                        self.metrics.lora_request(req.lora_request.lora_name, len(out.prompt_token_ids),
                                                  sum(len(c.token_ids) for c in out.outputs))
                yield chunk
                if finished:
                    return
        except ValueError as e:
            finished = True  # never admitted
            self.metrics.request_error("invalid_request")
            yield GenerateChunk(error=ReplicaError("invalid_request", str(e)))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - EngineDeadError and the unexpected
            logger.exception("request %s failed", req.request_id)
            self.metrics.request_error("engine_error")
            finished = True
            # The engine is gone for every request: let the ingress move this one.
            was_dead = self._engine_dead
            dead = not self.healthy()
            if dead:
                self._engine_dead = True
                self._fail_fast()
            yield GenerateChunk(error=ReplicaError("unavailable", f"The engine failed: {e}", retryable=dead,
                                                   dead_on_arrival=dead and was_dead and not accepted))
        finally:
            self._open_streams -= 1
            if not accepted:
                self._not_started -= 1
            if not finished:
                # Client gone or stream cancelled: free the request's KV blocks now.
                self.metrics.request_finished("abort", None)
                try:
                    await asyncio.shield(self.engine.abort(req.request_id))
                except (asyncio.CancelledError, Exception):  # noqa: BLE001 - abort is best effort, idempotent
                    pass

    def _decode_token(self, token_id: int) -> str:
        # As the engine's Logprob.decoded_token: one token alone, special tokens kept.
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    # -- LoRA adapters (cluster/lora_adapters.py) -----------------------------------
    def _load_lora_modules(self, model: ModelDeploymentConfig) -> None:
        """The config's ``lora_modules``, checked and read before the replica serves (a bad one fails its start)."""
        from fleetlm.cluster.lora_adapters import lora_request

        for name, path in model.lora_modules or ():
            try:
                self.engine.engine.add_lora(lora_request(name, path, model.name))
            except ValueError as e:
                raise ValueError(f"model {model.name!r}: lora_modules: {e}") from None

    async def add_lora(self, lora_request: Any) -> str | None:
        """Check and read an adapter: None when done, else why not (a 400 for the client)."""
        try:
            await self.engine.add_lora(lora_request)
        except ValueError as e:
            return str(e)
        return None

    async def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter; requests already running with it finish with it."""
        return await self.engine.remove_lora(lora_int_id)

    # -- control plane -----------------------------------------------------------
    def model_info(self) -> ModelInfo:
        mc = self.engine.model_config
        return ModelInfo(
            name=self.name,
            max_model_len=mc.max_model_len,
            block_size=self.engine.config.cache.block_size,
            vocab_size=mc.vocab_size,
            tokenizer=self.engine.tokenizer,
            max_num_seqs=self.max_num_seqs,
            tool_call_parser=self.tool_call_parser,
            enable_auto_tool_choice=self.enable_auto_tool_choice,
        )

    def healthy(self) -> bool:
        try:
            self.engine.check_health()
        except Exception:  # noqa: BLE001
            return False
        return True

    def _fail_fast(self) -> None:
        """The engine died (a worker actor or device is gone) and cannot come back.

        End this replica's process now rather than at Serve's next health
        check: until then Serve (and a prefix-aware router, which prefers the
        replica holding the prompt's blocks) would keep sending it requests
        that fail at once, re-submissions of migrated streams included. Serve
        sees the actor die, routes elsewhere, and starts a replacement; the
        worker actors this process owns die with it, so the TP x PP group is
        rebuilt as a whole.
        """
        if self._exiting or not self._owns_engine:
            return
        self._exiting = True
        logger.error("replica %s: engine dead, exiting in %.1f s so Serve replaces it", self.replica,
                     FAIL_FAST_EXIT_S)
        # A timer thread: works whether Serve calls us on the event loop or off it.
        timer = threading.Timer(FAIL_FAST_EXIT_S, os._exit, args=(1,))
        timer.daemon = True
        timer.start()

    def _record_prefill(self, seconds: float) -> None:
        if len(self._first_prefills) < PREFILL_SAMPLES:
            self._first_prefills.append(seconds)
        self._recent_prefills.append(seconds)

    def invariants(self) -> dict[str, Any]:
        """The engine's idle invariants (cluster/invariants.py), for ``/debug/invariants``, with the
        replica's start-up phases and prefill times (its first requests, its latest)."""
        from fleetlm.cluster.invariants import engine_invariants

        return {"replica": self.replica, "healthy": self.healthy(), **engine_invariants(self.engine).to_dict(),
                "startup_seconds": self.startup_seconds,
                "prefill_s": {"first": list(self._first_prefills), "recent": list(self._recent_prefills)}}

    def health(self) -> ReplicaHealth:
        try:
            self.engine.check_health()
        except Exception as e:  # noqa: BLE001
            return ReplicaHealth(self.replica, False, str(e))
        return ReplicaHealth(self.replica, True)

    def check_health(self) -> None:
        """Ray Serve's periodic health check: raising marks the replica unhealthy (restarted)."""
        try:
            self.engine.check_health()
        except Exception:
            self._engine_dead = True
            self._fail_fast()
            raise

    def metrics_families(self) -> list[Any]:
        return self.metrics.collect()

    def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve routing stats: queue depth and cached prefix blocks (cluster/router.py)."""
        from fleetlm.cluster.router import routing_summary

        return routing_summary(self.engine)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve custom autoscaling metrics: engine queue and KV usage (cluster/autoscaling.py)."""
        from fleetlm.cluster.autoscaling import autoscaling_stats

        return autoscaling_stats(self.engine)

    async def shutdown(self) -> None:
        # No __del__: when Serve stops the replica its process ends, and with
        # it the engine thread and the worker actors it owns.
        await self.engine.shutdown()
