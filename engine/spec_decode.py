"""Speculative decoding, engine side: who proposes what before each step, and what came of it.

The engine calls two hooks (``engine/llm_engine.py``):

- ``prepare_step`` before scheduling a step. A step scheduled ahead of the
  one in flight (asynchronous scheduling) is refused (None) when proposals
  are likely (``blocks_ahead``): they are made from real tokens, so such a
  step is scheduled synchronously; without a likely proposal (an n-gram
  miss, a large batch) steps go ahead as without speculation. Otherwise,
  unless the policy (``spec_policy.py``) turns the step off,
  ``before_schedule`` gives each running decode its proposals: n-gram
  lookups on the host (``Request.spec_token_ids``), or the number of tokens
  the draft model should propose after the step (``Request.num_draft_tokens``;
  the draft runs in the workers, ``workers/drafter.py``). Returns whether
  the draft model runs in the step.
- ``after_step``: time the step for the policy, count proposed / accepted /
  emitted tokens, feed each request's acceptance to the policy, and hand the
  draft model's new proposals to their requests.

``enabled`` switches the configured speculation off and on (A/B runs on one
engine, between requests): off, the hooks do nothing and steps are exactly
those of an engine without it.

Where a third proposer goes (an EAGLE-style head): like the draft model it
runs in the workers right after the target (it reads the target's last hidden
states), so it reuses this module's draft path (``num_draft_tokens``,
lookahead slots, proposals in ``ModelRunnerOutput.spec_token_ids``) and only
adds a worker-side proposer beside ``workers/drafter.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fleetlm.engine.request import Request
from fleetlm.engine.config import SpeculativeConfig
from fleetlm.engine.spec_ngram import NgramProposer
from fleetlm.engine.spec_policy import SpecPolicy
from fleetlm.engine.step import ModelRunnerOutput, SchedulerOutput

# Waiting requests given draft proposals for their prefill step (admitted next, if any).
_WAITING_LOOKAHEAD = 64


@dataclass
class SpecDecodeStats:
    """Counters since start (the metrics' fleetlm_spec_decode_*)."""

    num_verifies: int = 0  # a request's share of a step that verified proposals
    num_proposed_tokens: int = 0
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0  # tokens those shares produced: accepted + one of the target's own each
    num_steps_off: int = 0  # steps the batch-size switch left without speculation

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_proposed_tokens if self.num_proposed_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verifying request-step (1 + its accepted proposals)."""
        return self.num_emitted_tokens / self.num_verifies if self.num_verifies else 0.0


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.k = config.num_speculative_tokens
        self.policy = SpecPolicy(config)
        self.ngram = None if config.uses_draft_model else NgramProposer(
            self.k, config.prompt_lookup_min, config.prompt_lookup_max)
        self.stats = SpecDecodeStats()
        self._was_on = False
        self.enabled = True

    def prepare_step(self, scheduler, ahead: bool) -> bool | None:
        """Whether the draft model runs in the next step; None: do not schedule it ahead."""
        if not self.enabled:
            return False
        if ahead:
            return None if self.blocks_ahead(scheduler.running) else False
        return self.before_schedule(scheduler.running, scheduler.waiting)

    def stats_fields(self) -> dict[str, int]:
        """``EngineStats``' speculative counters."""
        st = self.stats
        return {"spec_decode_verifies": st.num_verifies, "spec_decode_proposed_tokens": st.num_proposed_tokens,
                "spec_decode_accepted_tokens": st.num_accepted_tokens,
                "spec_decode_emitted_tokens": st.num_emitted_tokens}

    def reset_stats(self) -> None:
        self.stats = SpecDecodeStats()

    def before_schedule(self, running: Sequence[Request], waiting: Iterable[Request]) -> bool:
        if not self.policy.step_on(len(running)):
            self.stats.num_steps_off += 1
            if self._was_on:  # proposals made for this step are dropped
                for req in running:
                    req.spec_token_ids, req.num_draft_tokens = [], 0
                self._was_on = False
            return False
        self._was_on = True
        if self.ngram is not None:
            for req in running:
                if _decoding(req) and self.policy.request_on(req):
                    req.spec_token_ids = self.ngram.propose(req)
            return False
        draft = False
        for req in itertools.chain(running, itertools.islice(waiting, _WAITING_LOOKAHEAD)):
            req.num_draft_tokens = self.k if self.policy.request_on(req) else 0
            draft = draft or req.num_draft_tokens > 0
        return draft

    def blocks_ahead(self, running: Sequence[Request]) -> bool:
        if not self.policy.step_on(len(running)):
            return False
        if self.ngram is None:  # the draft proposes every step for the requests it pays for
            return any(self.policy.would_propose(req) for req in running)
        return any(self.policy.would_propose(req) and self.ngram.match(req) is not None for req in running)

    def after_step(self, out: SchedulerOutput, result: ModelRunnerOutput, reqs: Sequence[Request] | None) -> None:
        """Every processed step. ``reqs``: the requests ``out`` scheduled, in order (some may have
        ended since), when it verified proposals or ran the draft model."""
        if not self.enabled:
            return
        speculating = bool(out.num_spec_tokens or out.draft)
        self.policy.observe_step(speculating, len(out.scheduled))
        if not speculating:
            return
        accepted = result.by_request()
        proposals = result.proposals_by_request()
        st = self.stats
        for s, req in zip(out.scheduled, reqs):
            if s.num_spec_tokens and s.request_id in accepted:
                n = len(accepted[s.request_id]) - 1
                st.num_verifies += 1
                st.num_proposed_tokens += s.num_spec_tokens
                st.num_accepted_tokens += n
                st.num_emitted_tokens += n + 1
                self.policy.observe(req, s.num_spec_tokens, n)
            if s.request_id in proposals and not req.is_finished:
                req.spec_token_ids = proposals[s.request_id]


def _decoding(req: Request) -> bool:
    """The request's next step computes only its newest token (and so may verify proposals)."""
    return not req.num_pending_tokens and req.num_computed_tokens == req.num_tokens - 1
