"""The synchronous engine: admit requests, run steps, turn tokens into outputs.

One ``step()``: the scheduler picks the work, the worker group runs it, the
scheduler takes in the accepted tokens (and ends requests on EOS / stop
tokens / length), and the output processor (``output_processor.py``)
detokenizes, applies stop strings and builds ``RequestOutput`` objects.
``n > 1`` fans a request out into ``n`` child requests that share the
prompt's blocks through the prefix cache.

How steps overlap is chosen once, when the engine is built (``StepMode``):

- ``sync``: schedule, run, take in; the next step starts from the result.
- ``async`` (one in-process device worker): while step N runs on the
  device, ``step()`` schedules and launches step N+1, whose decodes read
  N's sampled tokens on the device (placeholders on the host); then it waits
  for N and processes its outputs, so the host's work hides behind the
  device's. It falls back to a synchronous step when N+1 would need N's
  tokens on the host (see ``Scheduler.schedule(ahead=True)``).
- ``pipelined`` (pipeline parallelism): one micro-batch in flight per
  stage, over disjoint requests.

Guided requests (``engine/structured_output.py``) wait outside the scheduler
until their grammar compiles; a step carries its constrained rows' bitmask,
except an ahead step: its masks follow from the step in flight, so they are
supplied once that step is processed, while its forward pass runs.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque

from fleetlm.engine.config import EngineConfig
from fleetlm.engine.detokenizer import IncrementalDetokenizer
from fleetlm.engine.lora import LoRARegistry, LoRARequest
from fleetlm.engine.output_processor import OutputProcessor, RequestGroup, Sequence
from fleetlm.engine.outputs import RequestOutput
from fleetlm.engine.request import Request, RequestStatus
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.engine.scheduler import Scheduler
from fleetlm.engine.snapshot import EngineSnapshot, EngineStats
from fleetlm.engine.spec_decode import SpecDecoder
from fleetlm.engine.startup import start_up, tokenizer_and_workers
from fleetlm.engine.step import ModelRunnerOutput, SchedulerOutput
from fleetlm.engine.structured_output import StructuredOutput


class StepMode(enum.Enum):
    SYNC = "sync"
    ASYNC = "async"
    PIPELINED = "pipelined"


def choose_step_mode(async_scheduling: bool, workers) -> StepMode:
    """From what the worker group can do (``pipeline_depth``, ``supports_async``) and the setting."""
    if workers.pipeline_depth > 1:
        return StepMode.PIPELINED
    if async_scheduling:
        if not workers.supports_async:
            raise ValueError("async_scheduling needs workers that launch steps ahead (one pipeline stage)")
        return StepMode.ASYNC
    return StepMode.SYNC


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None, worker_group=None) -> None:
        self.config = config
        self.model_config = config.model
        self.tokenizer, self.workers, tokenizer_s = tokenizer_and_workers(config, tokenizer, worker_group)
        self.scheduler = Scheduler(config.scheduler, config.cache, self.workers.num_blocks, config.lora)
        self.loras = (LoRARegistry(config.model, config.lora, self.scheduler.loras, self.workers)
                      if config.lora is not None else None)
        self.outputs = OutputProcessor(self.scheduler.finish_request)
        self.spec = SpecDecoder(config.speculative) if config.speculative is not None else None
        self.structured: StructuredOutput | None = None  # made with the first guided request
        self._parked: list[RequestGroup] = []  # guided requests whose grammar is compiling
        self.num_steps = 0
        self.num_steps_ahead = 0  # steps launched while the one before was still in flight
        self.mode = choose_step_mode(bool(config.async_scheduling), self.workers)
        # (SchedulerOutput, pending result) of the steps sent and not yet processed, oldest first.
        self._in_flight: deque = deque()
        # Finished ids of steps that were empty (never sent): told to the workers with the next step.
        self._unsent_finished: list[str] = []
        # A step that raised left the scheduler advanced past work that never
        # ran (progress moves at schedule time): nothing may be scheduled after it.
        self._step_failure: BaseException | None = None
        # Seconds per start-up phase, the warm-up's report, the weights' GB/s (engine/startup.py).
        self.startup_seconds, self.warmup_report, self.startup_details = start_up(self, tokenizer_s)

    @property
    def async_scheduling(self) -> bool:
        return self.mode == StepMode.ASYNC

    @async_scheduling.setter
    def async_scheduling(self, on: bool) -> None:
        """Switch between sync and async steps (for A/B runs on one engine); only between steps."""
        assert not self._in_flight, "switch step modes only between requests"
        self.mode = choose_step_mode(on, self.workers)

    @property
    def groups(self) -> dict[str, RequestGroup]:
        return self.outputs.groups

    # -- requests ------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=False)
        return None, list(prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    lora_request: LoRARequest | None = None) -> None:
        """Validate and queue a request; raises ValueError (naming the problem) if it can never run."""
        self.add_group(self.make_group(request_id, prompt, params, lora_request=lora_request))

    def make_group(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        prior_output_token_ids: list[int] | None = None,
        lora_request: LoRARequest | None = None,
    ) -> RequestGroup:
        """Tokenize and validate without touching the scheduler (safe from any thread).

        ``prior_output_token_ids`` resumes a request that already produced
        those tokens elsewhere (migration after a replica failure): they count
        toward max_tokens, penalties and seeded sampling, and only the tokens
        after them are reported. ``lora_request`` runs it with that adapter
        (checked here: a bad one raises ``LoRAAdapterError``, a ValueError).
        """
        params = params or SamplingParams()
        lora = self._lora_registry().check(lora_request).adapter if lora_request is not None else None
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
        group = RequestGroup(request_id, text, ids)
        if params.guided_decoding is not None:
            group.grammar = self._structured().prepare(params)  # raises for a bad grammar, before anything runs
        bs = self.config.cache.block_size
        eos = self.model_config.eos_token_ids
        for i in range(params.n):
            child_params = params if params.n == 1 else params.clone_for_child(i)
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(child_id, ids, child_params, bs, eos, prior_output_token_ids=prior, lora=lora)
            detok = IncrementalDetokenizer(self.tokenizer, ids + prior, req.params)
            group.children.append(Sequence(i, req, detok))
        return group

    def add_group(self, group: RequestGroup) -> None:
        if group.request_id in self.groups:
            raise ValueError(f"request id {group.request_id!r} is already in use")
        if group.grammar is not None:  # (make_group checked that it fits)
            self._parked.append(group)
        else:
            self._schedule_group(group)
        self.outputs.add(group)

    def _schedule_group(self, group: RequestGroup) -> None:
        leader = None
        for child in group.children:
            self.scheduler.add_request(child.req, leader)
            leader = leader or child.req

    def _structured(self) -> StructuredOutput:
        if self.structured is None:
            self.structured = StructuredOutput.for_engine(self.config, self.tokenizer)
        return self.structured

    def _admit_compiled(self) -> list[RequestOutput]:
        """Guided requests whose grammar is ready go to the scheduler, in arrival order; returns
        the outputs of those whose grammar failed (with nothing else to do, waits a little)."""
        if not self._parked:
            return []
        live = [g for g in self._parked if self.groups.get(g.request_id) is g]  # not aborted meanwhile
        idle = not self.scheduler.requests and not self._in_flight
        ready, failed, self._parked = self.structured.sort_parked(live, wait_s=0.05 if idle else 0.0)
        for group in ready:
            self._schedule_group(group)
        return [self.outputs.pop(g.request_id).output() for g in failed]

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

    # -- adapters (vLLM's add_lora / remove_lora / list_loras) ----------------------
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Check an adapter (raises ``LoRAAdapterError``) and have the workers read it into host
        memory, so no step reads its files; False if it was added before."""
        return self._lora_registry().add(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter; requests running with it finish with it, then its slot is freed."""
        return self.loras is not None and self.loras.remove(lora_int_id)

    def list_loras(self) -> set[int]:
        return self.loras.ids() if self.loras is not None else set()

    def _lora_registry(self) -> LoRARegistry:
        if self.loras is None:
            raise ValueError("a LoRA adapter was given but the engine was built without enable_lora=True")
        return self.loras

    def abort_request(self, request_id: str) -> RequestOutput | None:
        group = self.outputs.pop(request_id)
        if group is None:
            return None
        for child in group.children:
            self.scheduler.finish_request(child.req.request_id, RequestStatus.FINISHED_ABORTED)
        group.abort()
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
            failed = self._admit_compiled()
            if self.mode == StepMode.PIPELINED:
                return failed + self._pipelined_step(emit_unfinished)
            if self.mode == StepMode.ASYNC:
                return failed + self._async_step(emit_unfinished)
            return failed + self._sync_step(emit_unfinished)
        except BaseException as e:
            self._step_failure = e
            raise

    def _sync_step(self, emit_unfinished: bool) -> list[RequestOutput]:
        out = self._schedule()
        if out is None:
            return []
        return self._process_step(out, self.workers.launch(self._with_grammar(out)).result(), emit_unfinished)

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
            self._in_flight.append((out, self.workers.launch(self._with_grammar(out))))
        ahead = self._schedule(ahead=True)
        if ahead is not None:
            ahead = self._with_grammar(ahead, later=True)
            self._in_flight.append((ahead, self.workers.launch(ahead)))
            self.num_steps_ahead += 1
        return self._finish_oldest(emit_unfinished)

    def _pipelined_step(self, emit_unfinished: bool) -> list[RequestOutput]:
        """Fill the pipeline with micro-batches over disjoint requests, then finish the oldest.

        One micro-batch in flight per stage: while stage k runs micro-batch m,
        stage k-1 already runs m+1. More would only queue at the first stage;
        fewer leaves stages idle.
        """
        while len(self._in_flight) < self.workers.pipeline_depth:
            busy = {s.request_id for out, _ in self._in_flight for s in out.scheduled}
            out = self._schedule(busy)
            if out is None:
                break
            self._in_flight.append((out, self.workers.launch(self._with_grammar(out))))
        if not self._in_flight:
            return []
        return self._finish_oldest(emit_unfinished)

    def _finish_oldest(self, emit_unfinished: bool) -> list[RequestOutput]:
        out, pending = self._in_flight.popleft()
        outputs = self._process_step(out, pending.result(), emit_unfinished)
        self._drain_if_idle()
        return outputs

    def _with_grammar(self, out: SchedulerOutput, later: bool = False) -> SchedulerOutput:
        return out if self.structured is None else self.structured.attach(out, self.scheduler.requests, later)

    def _drain_if_idle(self) -> None:
        """With no request left, the steps still in flight only compute for requests
        that ended: wait for them, so that an idle engine has nothing in flight."""
        while self._in_flight and not self.groups:
            out, pending = self._in_flight.popleft()
            self._process_step(out, pending.result(), emit_unfinished=False)

    def _schedule(self, exclude=frozenset(), ahead: bool = False) -> SchedulerOutput | None:
        draft = self.spec.prepare_step(self.scheduler, ahead) if self.spec is not None else False
        if draft is None:  # proposals are likely: the step waits for the one in flight
            return None
        out = self.scheduler.schedule(exclude, ahead, draft)
        if out.is_empty:
            self._unsent_finished += out.finished_request_ids
            return None
        if self._unsent_finished:
            out = dataclasses.replace(out, finished_request_ids=self._unsent_finished + out.finished_request_ids)
            self._unsent_finished = []
        return out

    def _process_step(self, out: SchedulerOutput, result: ModelRunnerOutput, emit_unfinished: bool) -> list[RequestOutput]:
        self.num_steps += 1
        reqs = self.scheduler.requests_in_flight(out.step_id) if out.num_spec_tokens or out.draft else None
        results = self.scheduler.update_from_output(out, result.by_request())
        if self.spec is not None:
            self.spec.after_step(out, result, reqs)
        if self.structured is not None:  # grammars take the new tokens; one that reached its end ends its request
            for req, status in self.structured.advance(results):
                self.scheduler.finish_request(req.request_id, status)
            if self._in_flight and self._in_flight[-1][0].grammar_later:
                # The step launched ahead samples under masks that follow from the tokens just taken in:
                # supplied before the outputs are assembled, which the device would otherwise wait for.
                ahead, step = self._in_flight[-1]
                step.supply_grammar(self.structured.bitmask(ahead, self.scheduler.requests))
        return self.outputs.process(results, result.logprobs_by_request(), emit_unfinished, result.prompt_logprobs)

    # -- state -----------------------------------------------------------------
    def stats(self) -> EngineStats:
        bm = self.scheduler.blocks
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + len(self._parked),
            kv_cache_usage=bm.usage,
            prefix_cache_queried_tokens=bm.queried_tokens,
            prefix_cache_hit_tokens=bm.hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            **(self.loras.stats() if self.loras is not None else {}),
            **(self.spec.stats_fields() if self.spec is not None else {}),
        )

    def reset_after_warmup(self) -> None:
        """Forget what synthetic requests left: cached prefixes and the counters metrics read."""
        assert not self.has_unfinished_requests() and not self._in_flight
        bm = self.scheduler.blocks
        bm.reset_prefix_cache()
        bm.queried_tokens = bm.hit_tokens = 0
        self.scheduler.num_preemptions = 0
        if self.spec is not None:
            self.spec.reset_stats()

    def snapshot(self) -> EngineSnapshot:
        """Requests and KV blocks as they are now (see ``engine/snapshot.py``)."""
        return EngineSnapshot.take(self.scheduler, num_output_groups=len(self.groups),
                                   num_steps_in_flight=len(self._in_flight))

    def idle_invariants(self) -> dict:
        """What must hold once no request is in flight (``EngineSnapshot.idle_report``)."""
        return self.snapshot().idle_report()

    def shutdown(self) -> None:
        if self.structured is not None:
            self.structured.shutdown()
        self.workers.shutdown()
