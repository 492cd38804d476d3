"""Continuous batching with chunked prefill, prefix caching and preemption.

See ``Scheduler.schedule`` for the scheduling model. Plain Python over ints:
the scheduler never touches tensors, so its tests run in microseconds.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from fleetlm.engine.block_manager import BlockManager, cdiv
from fleetlm.engine.config import CacheConfig, SchedulerConfig
from fleetlm.engine.request import Request, RequestStatus, needs_output_history
from fleetlm.engine.sampling_params import SamplingParams

# Token id of a pending token in a scheduled step (never a real vocabulary id).
PLACEHOLDER = -1


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step."""

    request_id: str
    # The tokens whose K/V this step computes; PLACEHOLDER for a token sampled
    # by the step still in flight (the runner takes it from that step's output).
    token_ids: list[int]
    start_pos: int  # position of token_ids[0] (= num_computed_tokens before the step)
    block_table: list[int]
    sample: bool  # the request's last token is computed this step: sample the next


@dataclass(frozen=True)
class NewRequest:
    """Sent to the workers once, the first time a request is scheduled."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prior_output_token_ids: list[int] = field(default_factory=list)  # migrated requests only


@dataclass(frozen=True)
class SchedulerOutput:
    """Everything the workers need for one step (and nothing else)."""

    scheduled: list[ScheduledRequest]
    new_requests: list[NewRequest] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)  # workers drop their state
    preempted_request_ids: list[str] = field(default_factory=list)
    step_id: int = 0  # matches the step's result to the requests it scheduled

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, sched: SchedulerConfig, cache: CacheConfig, num_blocks: int) -> None:
        self.config = sched
        self.block_size = cache.block_size
        self.blocks = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._seen_by_workers: set[str] = set()
        self._finished_since_last_step: list[str] = []
        self.num_preemptions = 0
        # n > 1: siblings wait for the first child's prompt to be computed,
        # then share its blocks through the prefix cache.
        self._leader: dict[str, Request] = {}
        # Steps scheduled but not yet updated: step_id -> the Request objects
        # they scheduled (by object, so a request id reused after an abort
        # never receives the old request's tokens).
        self._in_flight: dict[int, list[Request]] = {}
        self._next_step_id = 0

    # -- admission -----------------------------------------------------------
    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise ValueError for a request that could never run (instead of queueing it forever)."""
        max_len = self.config.max_model_len
        total = num_prompt_tokens + max_tokens
        if total > max_len:
            raise ValueError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) "
                f"= {total} exceeds max_model_len ({max_len})"
            )
        # The last sampled token is never fed back, so it needs no KV slot.
        need = cdiv(total - 1, self.block_size)
        if need > self.blocks.num_blocks:
            raise ValueError(
                f"request needs {need} KV blocks ({total - 1} tokens of KV) but the cache holds only "
                f"{self.blocks.num_blocks} blocks of {self.block_size} tokens"
            )

    def add_request(self, req: Request, leader: Request | None = None) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.check_fits(req.num_prompt_tokens, req.params.max_tokens)
        self.requests[req.request_id] = req
        if leader is not None and self.blocks.enable_prefix_caching:
            self._leader[req.request_id] = leader
        self.waiting.append(req)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request in any state (abort, stop string, error); idempotent."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        req.times.finished = time.monotonic()
        self.blocks.free_request(request_id)
        self._leader.pop(request_id, None)
        if request_id in self._seen_by_workers:
            self._seen_by_workers.discard(request_id)
            self._finished_since_last_step.append(request_id)
        return req

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # -- the step ------------------------------------------------------------
    def schedule(self, exclude: frozenset[str] | set[str] = frozenset(), ahead: bool = False) -> SchedulerOutput:
        """Choose the requests and token counts of the next step.

        Every request has ``num_tokens`` (prompt + generated) and
        ``num_computed_tokens``; a step closes part of each gap under a token
        budget (``max_num_batched_tokens``) and a sequence cap
        (``max_num_seqs``). Running requests go first, in admission order: a
        decode takes one token, an unfinished prefill takes what the budget
        leaves (chunked prefill). If the pool has no block for a running
        request, the most recently admitted running request is preempted: its
        blocks are freed and it goes back to the head of the queue, to be
        recomputed later (cheaply, its full blocks usually survive in the
        prefix cache). Then waiting requests are admitted first-come
        first-served while budget, sequence cap and blocks allow, each starting
        after its longest cached prefix. Nothing is admitted in a step that
        preempted, so a preempted request is not overtaken by newcomers.
        Progress is advanced here, at schedule time: the step will compute
        what it was given; a step that samples leaves a pending token.

        ``exclude`` names running requests that are part of a step still in
        flight (pipeline parallelism keeps several micro-batches in flight
        over disjoint requests): they are neither scheduled nor preempted.

        ``ahead``: one step is in flight and this one may run right behind it
        on the same device (asynchronous scheduling): its pending tokens become
        placeholders. Requests whose pending token ends them on length are
        skipped. Nothing is preempted, and a request with a pending token whose
        sampling needs its output history on the host (penalties) cannot be
        scheduled: in both cases the step comes back empty and the engine
        waits for the step in flight instead (synchronous fallback).
        """
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        cap = cfg.long_prefill_token_threshold or budget
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.request_id in exclude or req.finishes_on_length_with_pending(cfg.max_model_len):
                i += 1
                continue
            assert ahead or not req.num_pending_tokens, f"{req} has a pending token outside an ahead step"
            if ahead and req.num_pending_tokens and needs_output_history(req.params):
                return SchedulerOutput(scheduled=[])
            n = min(req.num_tokens - req.num_computed_tokens, budget, cap)
            while not self.blocks.allocate_slots(req, n):
                if ahead:
                    # Blocks already added to earlier requests' tables are the
                    # ones they need next anyway; nothing else changed.
                    return SchedulerOutput(scheduled=[])
                victim = next((r for r in reversed(self.running) if r.request_id not in exclude), None)
                self.running.remove(victim)
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break
            scheduled.append((req, n))
            budget -= n
            i += 1

        if not preempted:
            skipped: list[Request] = []
            while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
                req = self.waiting[0]
                if self._must_wait_for_leader(req):
                    skipped.append(self.waiting.popleft())
                    continue
                hits = self.blocks.get_computed_blocks(req)
                num_cached = len(hits) * self.block_size
                n = min(req.num_tokens - num_cached, budget, cap)
                if not self.blocks.allocate_slots(req, n, hits):
                    break
                self.waiting.popleft()
                req.num_computed_tokens = num_cached
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = num_cached
                if req.times.first_scheduled is None:
                    req.times.first_scheduled = time.monotonic()
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                scheduled.append((req, n))
                budget -= n
            self.waiting.extendleft(reversed(skipped))

        new_requests = []
        out = []
        for req, n in scheduled:
            if req.request_id not in self._seen_by_workers:
                self._seen_by_workers.add(req.request_id)
                prior = req.token_ids[req.num_prompt_tokens : req.num_prompt_tokens + req.num_prior_output_tokens]
                new_requests.append(NewRequest(req.request_id, req.prompt_token_ids, req.params, prior))
            start = req.num_computed_tokens
            token_ids = req.token_ids[start : start + n]
            token_ids += [PLACEHOLDER] * (n - len(token_ids))
            sample = start + n == req.num_tokens
            req.num_computed_tokens += n
            req.num_pending_tokens += sample
            out.append(
                ScheduledRequest(
                    request_id=req.request_id,
                    token_ids=token_ids,
                    start_pos=start,
                    block_table=list(self.blocks.blocks_of(req.request_id)),
                    sample=sample,
                )
            )
        finished, self._finished_since_last_step = self._finished_since_last_step, []
        step_id = self._next_step_id
        if out:
            self._next_step_id += 1
            self._in_flight[step_id] = [req for req, _ in scheduled]
        return SchedulerOutput(
            scheduled=out,
            new_requests=new_requests,
            finished_request_ids=finished,
            preempted_request_ids=[r.request_id for r in preempted],
            step_id=step_id,
        )

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[tuple[Request, int | None]]:
        """Take in a step's result; returns (request, new token or None) per scheduled request still running.

        Each sampled token replaces the request's oldest pending token.
        Requests whose last token ended them (EOS, stop token, length) are
        finished here; stop strings are the engine's business. Requests that
        ended while the step ran (abort, a stop found in the step before) are
        skipped: their share of the step is discarded.
        """
        now = time.monotonic()
        results = []
        reqs = self._in_flight.pop(out.step_id, [])
        assert len(reqs) == len(out.scheduled), "update_from_output for a step not scheduled (or updated twice)"
        for s, req in zip(out.scheduled, reqs):
            if req.status != RequestStatus.RUNNING:  # ended while the step ran
                continue
            # Only real tokens have hashes, so only blocks of real tokens are
            # cached, though their K/V may still be written by a step in flight:
            # any step that reads them runs after it on the same stream.
            self.blocks.cache_full_blocks(req)
            token = None
            if s.sample:
                token = sampled[s.request_id]
                req.append_token(token)
                if req.times.first_token is None:
                    req.times.first_token = now
                stop = req.check_token_stop(self.config.max_model_len)
                if stop is not None:
                    self.finish_request(req.request_id, stop)
            results.append((req, token))
        return results

    @property
    def num_steps_in_flight(self) -> int:
        return len(self._in_flight)

    # -- internals -----------------------------------------------------------
    def _preempt(self, req: Request) -> None:
        assert not req.num_pending_tokens, f"{req} preempted while a step computes it"
        self.blocks.free_request(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _must_wait_for_leader(self, req: Request) -> bool:
        leader = self._leader.get(req.request_id)
        if leader is None:
            return False
        # A real output token means the whole prompt was computed and its full
        # blocks are in the prefix cache (progress alone runs ahead of that).
        if leader.is_finished or leader.num_output_tokens > leader.num_prior_output_tokens:
            del self._leader[req.request_id]
            return False
        return True

