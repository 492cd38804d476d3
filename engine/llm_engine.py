"""The synchronous engine: admit requests, run steps, turn tokens into outputs.

One ``step()``: the scheduler picks the work, the worker group runs it, the
scheduler takes in the sampled tokens (and ends requests on EOS / stop tokens /
length), and the output processor detokenizes, applies stop strings and
builds ``RequestOutput`` objects. ``n > 1`` fans a request out into ``n``
child requests that share the prompt's blocks through the prefix cache.

Asynchronous scheduling (one in-process device worker): while step N runs on
the device, ``step()`` schedules and launches step N+1, whose decodes read
N's sampled tokens on the device (placeholders on the host); then it waits
for N and processes its outputs, so the host's work hides behind the device's.
It falls back to a synchronous step when N+1 would need N's tokens on the host
(see ``Scheduler.schedule(ahead=True)``).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass

from fleetlm.engine.config import EngineConfig
from fleetlm.engine.detokenizer import IncrementalDetokenizer
from fleetlm.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from fleetlm.engine.request import Request, RequestStatus
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.engine.scheduler import Scheduler
from fleetlm.engine.snapshot import EngineSnapshot


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_preemptions: int
    num_steps: int
    last_step_time: float


class _Child:
    """Output-side state of one of the n sequences of a request."""

    def __init__(self, index: int, req: Request, detok: IncrementalDetokenizer) -> None:
        self.index, self.req, self.detok = index, req, detok
        self.logprobs: list[dict[int, Logprob]] | None = [] if req.params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if req.params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # Without stop strings nothing depends on the text until someone reads
        # it, so tokens wait here and are detokenized in one call per output.
        self.undecoded: list[int] = []
        self.text_done = False

    def text(self) -> str:
        if self.undecoded:
            self.detok.update(self.undecoded)
            self.undecoded = []
        if self.finish_reason is not None and not self.text_done:
            self.detok.flush()
            self.text_done = True
        return self.detok.output_text


class _Group:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int]) -> None:
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.children: list[_Child] = []

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)

    def output(self) -> RequestOutput:
        first = self.children[0].req
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    index=c.index,
                    text=c.text(),
                    token_ids=c.req.output_token_ids[c.req.num_prior_output_tokens :],
                    cumulative_logprob=c.cumulative_logprob,
                    logprobs=c.logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
                for c in self.children
            ],
            finished=self.finished,
            num_cached_tokens=max(0, first.num_cached_tokens),
            metrics=RequestMetrics(
                arrival_time=first.times.arrival,
                first_scheduled_time=first.times.first_scheduled,
                first_token_time=min((c.req.times.first_token for c in self.children if c.req.times.first_token), default=None),
                finished_time=max((c.req.times.finished or 0 for c in self.children), default=None) if self.finished else None,
            ),
        )


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None, worker_group=None) -> None:
        from fleetlm.workers.loader import load_tokenizer, resolve_model
        from fleetlm.workers.worker_group import create_worker_group

        self.config = config
        self.model_config = config.model
        if tokenizer is None:
            mc = config.model
            if mc.tokenizer is not None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer)
            else:
                tokenizer = load_tokenizer(resolve_model(mc.model, "dummy" if mc.kind == "dummy" else "auto"))
            if mc.chat_template is not None:
                tokenizer.chat_template = mc.chat_template
        self.tokenizer = tokenizer
        self.workers = worker_group or create_worker_group(config)
        self.scheduler = Scheduler(config.scheduler, config.cache, self.workers.num_blocks)
        self.groups: dict[str, _Group] = {}
        self._child_to_group: dict[str, tuple[_Group, _Child]] = {}
        self.num_steps = 0
        self.num_steps_ahead = 0  # steps launched while the one before was still in flight
        self.last_step_time = time.monotonic()
        # Pipeline parallelism: keep one micro-batch in flight per stage, so
        # that while stage k runs micro-batch m, stage k-1 already runs m+1.
        # More would only queue at the first stage; fewer leaves stages idle.
        self.pipeline_depth = config.parallel.pipeline_parallel_size if hasattr(self.workers, "submit") else 1
        self.async_scheduling = bool(config.async_scheduling) and hasattr(self.workers, "launch")
        # (SchedulerOutput, pending result) of the steps sent and not yet processed, oldest first.
        self._in_flight: deque = deque()
        # Finished ids of steps that were empty (never sent): told to the workers with the next step.
        self._unsent_finished: list[str] = []
        # A step that raised left the scheduler advanced past work that never
        # ran (progress moves at schedule time): nothing may be scheduled after it.
        self._step_failure: BaseException | None = None

    # -- requests ------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=False)
        return None, list(prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        """Validate and queue a request; raises ValueError (naming the problem) if it can never run."""
        self.add_group(self.make_group(request_id, prompt, params))

    def make_group(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        prior_output_token_ids: list[int] | None = None,
    ) -> _Group:
        """Tokenize and validate without touching the scheduler (safe from any thread).

        ``prior_output_token_ids`` resumes a request that already produced
        those tokens elsewhere (migration after a replica failure): they count
        toward max_tokens, penalties and seeded sampling, and only the tokens
        after them are reported.
        """
        params = params or SamplingParams()
        text, ids = self.tokenize(prompt)
        self._validate(ids, params)
        prior = list(prior_output_token_ids or ())
        if prior:
            if params.n != 1:
                raise ValueError("n must be 1 to resume a request from prior output tokens")
            self._validate(ids + prior, params)
            if params.max_tokens is not None and len(prior) >= params.max_tokens:
                raise ValueError(f"prior output ({len(prior)} tokens) already reaches max_tokens ({params.max_tokens})")
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=self.model_config.max_model_len - len(ids))
        self.scheduler.check_fits(len(ids), params.max_tokens)
        group = _Group(request_id, text, ids)
        bs = self.config.cache.block_size
        eos = self.model_config.eos_token_ids
        for i in range(params.n):
            child_params = params if params.n == 1 else params.clone_for_child(i)
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(child_id, ids, child_params, bs, eos, prior_output_token_ids=prior)
            detok = IncrementalDetokenizer(self.tokenizer, ids + prior, req.params)
            group.children.append(_Child(i, req, detok))
        return group

    def add_group(self, group: _Group) -> None:
        if group.request_id in self.groups:
            raise ValueError(f"request id {group.request_id!r} is already in use")
        leader = None
        for child in group.children:
            self.scheduler.add_request(child.req, leader)
            leader = leader or child.req
            self._child_to_group[child.req.request_id] = (group, child)
        self.groups[group.request_id] = group

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        mc = self.model_config
        if not ids:
            raise ValueError("prompt must not be empty")
        vocab = mc.vocab_size
        bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})")
        if len(ids) >= mc.max_model_len:
            raise ValueError(
                f"prompt is {len(ids)} tokens, the model's max_model_len is {mc.max_model_len} "
                "(prompt + at least one generated token must fit)"
            )
        params.validate_for_model(vocab, max_logprobs=self.config.max_logprobs, max_n=self.config.max_n)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        group = self.groups.pop(request_id, None)
        if group is None:
            return None
        for child in group.children:
            self.scheduler.finish_request(child.req.request_id, RequestStatus.FINISHED_ABORTED)
            self._child_to_group.pop(child.req.request_id, None)
            if child.finish_reason is None:
                child.finish_reason = "abort"
        self._drain_if_idle()
        return group.output()

    def has_unfinished_requests(self) -> bool:
        # Steps in flight without requests are drained as soon as the last request ends.
        return bool(self.groups) or bool(self._in_flight)

    # -- the step ------------------------------------------------------------
    def step(self, emit_unfinished: bool = True) -> list[RequestOutput]:
        """Run one step; return outputs of the requests it advanced (only finished ones if not emit_unfinished).

        After a step raised (a worker died, a collective timed out), every
        later call raises too: the worker group's own error if it knows it
        failed, else a RuntimeError naming the first failure.
        """
        if self._step_failure is not None:
            self.workers.check_health()
            raise RuntimeError(f"an earlier step failed, the engine cannot continue: {self._step_failure!r}")
        try:
            return self._step(emit_unfinished)
        except BaseException as e:
            self._step_failure = e
            raise

    def _step(self, emit_unfinished: bool) -> list[RequestOutput]:
        if self.pipeline_depth > 1:
            return self._pipelined_step(emit_unfinished)
        if self.async_scheduling:
            return self._async_step(emit_unfinished)
        out = self._schedule()
        if out is None:
            return []
        return self._process_step(out, self.workers.execute(out), emit_unfinished)

    def _async_step(self, emit_unfinished: bool) -> list[RequestOutput]:
        """Launch the step after the one in flight, then wait for and process the one in flight.

        Between calls at most one step is in flight. When the next step cannot
        be scheduled ahead (nothing to do, or it needs the tokens in flight on
        the host) this call is synchronous: the next one schedules from the
        processed state.
        """
        if not self._in_flight:
            out = self._schedule()
            if out is None:
                return []
            self._in_flight.append((out, self.workers.launch(out)))
        ahead = self._schedule(ahead=True)
        if ahead is not None:
            self._in_flight.append((ahead, self.workers.launch(ahead)))
            self.num_steps_ahead += 1
        out, pending = self._in_flight.popleft()
        outputs = self._process_step(out, pending.result(), emit_unfinished)
        self._drain_if_idle()
        return outputs

    def _drain_if_idle(self) -> None:
        """With no request left, the steps still in flight only compute for requests
        that ended: wait for them, so that an idle engine has nothing in flight."""
        while self._in_flight and not self.groups:
            out, pending = self._in_flight.popleft()
            result = self.workers.collect(pending) if self.pipeline_depth > 1 else pending.result()
            self._process_step(out, result, emit_unfinished=False)

    def _schedule(self, exclude=frozenset(), ahead: bool = False):
        out = self.scheduler.schedule(exclude, ahead)
        if out.is_empty:
            self._unsent_finished += out.finished_request_ids
            return None
        if self._unsent_finished:
            out = dataclasses.replace(out, finished_request_ids=self._unsent_finished + out.finished_request_ids)
            self._unsent_finished = []
        return out

    def _pipelined_step(self, emit_unfinished: bool) -> list[RequestOutput]:
        """Fill the pipeline with micro-batches over disjoint requests, then finish the oldest."""
        while len(self._in_flight) < self.pipeline_depth:
            busy = {s.request_id for out, _ in self._in_flight for s in out.scheduled}
            out = self._schedule(busy)
            if out is None:
                break
            self._in_flight.append((out, self.workers.submit(out)))
        if not self._in_flight:
            return []
        out, pending = self._in_flight.popleft()
        outputs = self._process_step(out, self.workers.collect(pending), emit_unfinished)
        self._drain_if_idle()
        return outputs

    def _process_step(self, out, result, emit_unfinished: bool) -> list[RequestOutput]:
        self.num_steps += 1
        self.last_step_time = time.monotonic()
        sampled = dict(zip(result.request_ids, result.sampled_token_ids))
        logprobs = dict(zip(result.request_ids, result.logprobs)) if result.logprobs else {}
        touched: dict[str, _Group] = {}
        for req, token in self.scheduler.update_from_output(out, sampled):
            if token is None:
                continue
            group, child = self._child_to_group[req.request_id]
            self._process_token(child, req, token, logprobs.get(req.request_id))
            touched[group.request_id] = group
        outputs = []
        for group in touched.values():
            if emit_unfinished or group.finished:
                outputs.append(group.output())
            if group.finished:
                self.groups.pop(group.request_id, None)
                for c in group.children:
                    self._child_to_group.pop(c.req.request_id, None)
        return outputs

    def _process_token(self, child: _Child, req: Request, token: int, lps) -> None:
        if lps is not None and child.logprobs is not None:
            entry = {}
            for tid, lp, rank in lps:
                if tid not in entry:
                    entry[tid] = Logprob(lp, rank, child.detok.decode_token(tid))
            child.logprobs.append(entry)
            child.cumulative_logprob += lps[0][1]
        # A request that stopped on EOS or a stop token id leaves that token out of its text.
        stopped_on_token = req.status == RequestStatus.FINISHED_STOPPED
        if not (stopped_on_token and not req.params.include_stop_str_in_output):
            child.undecoded.append(token)
        if req.params.stop and not req.is_finished:
            # Stop strings are matched as text arrives, so decode now.
            stop_str = child.detok.update(child.undecoded)
            child.undecoded = []
            if stop_str is not None:
                self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
                req.stop_reason = stop_str
                child.text_done = True  # the detokenizer already cut the text at the stop string
        if req.is_finished:
            child.finish_reason = req.status.finish_reason
            child.stop_reason = req.stop_reason

    def stats(self) -> EngineStats:
        bm = self.scheduler.blocks
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            prefix_cache_queried_tokens=bm.queried_tokens,
            prefix_cache_hit_tokens=bm.hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
            last_step_time=self.last_step_time,
        )

    def snapshot(self) -> EngineSnapshot:
        """Requests and KV blocks as they are now (see ``engine/snapshot.py``)."""
        return EngineSnapshot.take(self.scheduler, num_output_groups=len(self.groups),
                                   num_steps_in_flight=len(self._in_flight))

    def idle_invariants(self) -> dict:
        """What must hold once no request is in flight (asserted by tests after faults).

        Every block is free or cached-unreferenced (none referenced), nothing
        runs or waits, no step is in flight, and the block manager's
        structural invariants hold.
        """
        snap = self.snapshot()
        violations = snap.violations()
        return {
            "num_blocks": snap.num_blocks,
            "free_blocks": snap.num_free_blocks - snap.num_cached_free_blocks,
            "cached_unreferenced_blocks": snap.num_cached_free_blocks,
            "referenced_blocks": len(snap.referenced_blocks),
            "running": snap.num_running,
            "waiting": snap.num_waiting,
            "open_requests": snap.num_output_groups,
            "steps_in_flight": snap.num_steps_in_flight,
            "violations": violations,
            "ok": not violations,
        }

    def shutdown(self) -> None:
        self.workers.shutdown()
