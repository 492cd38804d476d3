"""Continuous batching with chunked prefill, prefix caching and preemption.

See ``Scheduler.schedule`` for the scheduling model. Plain Python over ints:
the scheduler never touches tensors, so its tests run in microseconds.
"""

from __future__ import annotations

import time
from collections import deque

from fleetlm.engine.block_manager import BlockManager, cdiv
from fleetlm.engine.config import CacheConfig, SchedulerConfig
from fleetlm.engine.lora import LoRAConfig
from fleetlm.engine.lora_slots import LoRASlots
from fleetlm.engine.request import Request, RequestStatus
from fleetlm.engine.sampling_params import needs_output_history
from fleetlm.engine.step import PLACEHOLDER, NewRequest, ScheduledRequest, SchedulerOutput

class Scheduler:
    def __init__(self, sched: SchedulerConfig, cache: CacheConfig, num_blocks: int,
                 lora: LoRAConfig | None = None) -> None:
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
        # Multi-LoRA: the adapters in the workers' device slots (engine/lora_slots.py).
        self.loras = LoRASlots(lora.max_loras) if lora is not None else None

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
            if self.loras:
                self.loras.release(req.lora)
        elif req in self.waiting:
            self.waiting.remove(req)
            if self.loras:
                self.loras.forget(request_id)
        req.status = status
        req.times.finished = time.monotonic()
        self.blocks.free_request(request_id)
        self._leader.pop(request_id, None)
        if request_id in self._seen_by_workers:
            self._seen_by_workers.discard(request_id)
            self._finished_since_last_step.append(request_id)
        return req

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
        With LoRA, a waiting request is admitted only if its adapter holds
        (or can take) one of the device slots (``engine/lora_slots.py``),
        else it keeps its place and the scan goes on.
        Progress is advanced here, at schedule time: the step will compute
        what it was given; a step that samples leaves a pending token. A
        decode whose request holds proposals (``Request.spec_token_ids``)
        also computes as many of them as the budget, max_tokens and
        max_model_len allow, to verify them; the result rolls back the
        positions of those rejected (``update_from_output``).

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
        if self.loras:
            self.loras.begin_step()
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
            if ahead and req.num_pending_tokens and (needs_output_history(req.params) or req.num_spec_in_flight):
                # Its pending tokens' values, or their number (a verify step), are needed on the host.
                return SchedulerOutput(scheduled=[])
            n = min(req.num_tokens - req.num_computed_tokens, budget, cap)
            if not ahead and n == req.num_tokens - req.num_computed_tokens:
                n += self._num_spec(req, budget - n)
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
                if self._must_wait_for_leader(req) or (
                        self.loras and not self.loras.can_acquire(req.request_id, req.lora)):
                    skipped.append(self.waiting.popleft())
                    continue
                hits = self.blocks.get_computed_blocks(req)
                num_cached = len(hits) * self.block_size
                n = min(req.num_tokens - num_cached, budget, cap)
                if not self.blocks.allocate_slots(req, n, hits):
                    break
                self.waiting.popleft()
                if self.loras:
                    self.loras.acquire(req.request_id, req.lora)
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
                new_requests.append(NewRequest(req.request_id, req.prompt_token_ids, req.params, prior,
                                               req.lora.lora_int_id if req.lora else None))
            start = req.num_computed_tokens
            num_spec = max(0, start + n - req.num_tokens)  # proposals past the newest token
            n_real = n - num_spec
            token_ids = req.token_ids[start : start + n_real]
            token_ids += [PLACEHOLDER] * (n_real - len(token_ids))
            token_ids += req.spec_token_ids[:num_spec]
            sample = start + n_real == req.num_tokens
            req.num_computed_tokens += n
            req.num_pending_tokens += sample
            req.num_spec_in_flight = num_spec
            req.spec_token_ids = []  # used (or dropped: proposals are for one step)
            out.append(
                ScheduledRequest(
                    request_id=req.request_id,
                    token_ids=token_ids,
                    start_pos=start,
                    block_table=list(self.blocks.blocks_of(req.request_id)),
                    sample=sample,
                    num_spec_tokens=num_spec,
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
            lora_loads=self.loras.take_loads() if self.loras and out else {},
        )

    def update_from_output(self, out: SchedulerOutput, accepted: dict[str, list[int]]) -> list[tuple[Request, list[int]]]:
        """Take in a step's result; returns (request, its new tokens) per scheduled request still running.

        ``accepted`` holds each sampling request's accepted tokens (see
        ``engine/step.py``): the first replaces the request's pending token;
        with proposals, the K/V positions of the rejected ones are rolled back
        and their blocks given back. Tokens are appended one by one and
        checked for EOS, stop token and length: a request that stops keeps no
        token after the one that stopped it, and is finished here; stop
        strings are the engine's business. Requests that ended while the step
        ran (abort, a stop found in the step before) are skipped: their share
        of the step is discarded.
        """
        now = time.monotonic()
        results = []
        reqs = self._in_flight.pop(out.step_id, [])
        assert len(reqs) == len(out.scheduled), "update_from_output for a step not scheduled (or updated twice)"
        for s, req in zip(out.scheduled, reqs):
            if req.status != RequestStatus.RUNNING:  # ended while the step ran
                continue
            tokens = accepted[s.request_id] if s.sample else []
            if s.num_spec_tokens:
                assert 1 <= len(tokens) <= 1 + s.num_spec_tokens, (s.request_id, tokens)
                self._roll_back(req, s.num_spec_tokens - (len(tokens) - 1))
            # Only real tokens have hashes, so only blocks of real tokens are
            # cached, though their K/V may still be written by a step in flight:
            # any step that reads them runs after it on the same stream.
            self.blocks.cache_full_blocks(req)
            kept = []
            for token in tokens:
                req.append_token(token)
                kept.append(token)
                if req.times.first_token is None:
                    req.times.first_token = now
                stop = req.check_token_stop(self.config.max_model_len)
                if stop is not None:
                    self.finish_request(req.request_id, stop)
                    break
            results.append((req, kept))
        return results

    @property
    def num_steps_in_flight(self) -> int:
        return len(self._in_flight)

    # -- internals -----------------------------------------------------------
    def _num_spec(self, req: Request, budget: int) -> int:
        """How many of ``req``'s proposals fit this step: the budget, max_tokens and max_model_len bound them."""
        if not req.spec_token_ids or budget <= 0 or req.num_pending_tokens:
            return 0
        room_out = req.params.max_tokens - req.num_output_tokens - 1  # the step's own token comes first
        room_len = self.config.max_model_len - req.num_tokens - 1
        return max(0, min(len(req.spec_token_ids), budget, room_out, room_len))

    def _roll_back(self, req: Request, num_rejected: int) -> None:
        """Forget the K/V of ``num_rejected`` trailing proposals; give back the blocks only they used."""
        req.num_spec_in_flight = 0
        if num_rejected:
            req.num_computed_tokens -= num_rejected
            self.blocks.trim(req.request_id, req.num_computed_tokens)


    def _preempt(self, req: Request) -> None:
        assert not req.num_pending_tokens, f"{req} preempted while a step computes it"
        self.blocks.free_request(req.request_id)
        if self.loras:
            self.loras.release(req.lora)
        req.spec_token_ids = []
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

