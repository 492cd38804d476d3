"""The step contract: what the scheduler sends the workers each step, and what comes back.

Both sides import this module and nothing of each other: the engine
(``engine/``) builds ``SchedulerOutput`` and reads ``ModelRunnerOutput``;
the workers (``workers/``) do the opposite. Plain dataclasses of ints (and
``SamplingParams``): they cross Ray between processes.

One scheduled request computes the K/V of ``token_ids`` at positions
``start_pos ...``. When ``sample`` is set, the last ``1 + num_spec_tokens``
of them produce logits: the request's newest token, then ``num_spec_tokens``
proposed ones (speculative decoding) to verify. The result for that request
is the list of accepted tokens, 1 to ``1 + num_spec_tokens`` long: the
proposals the target model agreed with, then the token it sampled after the
last agreed one. Without proposals, exactly one token. KV slots of rejected
proposals are given back by the scheduler (``Scheduler.update_from_output``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleetlm.engine.sampling_params import SamplingParams

# Token id of a pending token in a scheduled step (never a real vocabulary id):
# sampled by the step still in flight, the runner takes it from that step's output.
PLACEHOLDER = -1


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step."""

    request_id: str
    # The tokens whose K/V this step computes; PLACEHOLDER for a token sampled
    # by the step still in flight. Proposed tokens, if any, are the last
    # ``num_spec_tokens`` of them.
    token_ids: list[int]
    start_pos: int  # position of token_ids[0] (= num_computed_tokens before the step)
    block_table: list[int]
    sample: bool  # the request's newest token is computed this step: sample after it
    num_spec_tokens: int = 0  # proposals at the end of token_ids, verified this step

    @property
    def num_logits(self) -> int:
        """Positions of this request whose logits the step needs."""
        return 1 + self.num_spec_tokens if self.sample else 0

    @property
    def spec_token_ids(self) -> list[int]:
        return self.token_ids[len(self.token_ids) - self.num_spec_tokens:] if self.num_spec_tokens else []


@dataclass(frozen=True)
class LoRAAdapter:
    """A LoRA adapter the engine has checked (``engine/lora.py``): what a worker needs to load it."""

    lora_int_id: int
    lora_name: str
    path: str  # the local PEFT directory (adapter_config.json + adapter_model.safetensors)
    scaling: float  # lora_alpha / r (or / sqrt(r) with use_rslora)

    @property
    def cache_key(self) -> str:
        """The prefix cache's extra key: blocks computed under one adapter never serve another."""
        return f"lora:{self.lora_int_id}"


@dataclass(frozen=True)
class NewRequest:
    """Sent to the workers once, the first time a request is scheduled."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prior_output_token_ids: list[int] = field(default_factory=list)  # migrated requests only
    lora_int_id: int | None = None  # its adapter: it runs in that adapter's device slot


@dataclass(frozen=True)
class GrammarBitmask:
    """Allowed tokens of a step's constrained sampling rows (structured output).

    ``request_ids``: the constrained requests that sample this step, in step
    order; each owns ``1 + num_spec_tokens`` consecutive rows of ``bitmask``,
    an int32 CPU tensor ``[rows, ceil(vocab / 32)]`` whose bit ``t % 32`` of
    word ``t // 32`` is set when token ``t`` is allowed. Other rows sample freely.
    """

    request_ids: list[str]
    bitmask: Any


@dataclass(frozen=True)
class SchedulerOutput:
    """Everything the workers need for one step (and nothing else)."""

    scheduled: list[ScheduledRequest]
    new_requests: list[NewRequest] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)  # workers drop their state
    preempted_request_ids: list[str] = field(default_factory=list)
    step_id: int = 0  # matches the step's result to the requests it scheduled
    # Structured output: the bitmask of the step's constrained rows; or, with
    # ``grammar_later``, it depends on the step in flight: the worker runs the
    # forward pass and waits for ``PendingStep.supply_grammar`` to sample.
    grammar: GrammarBitmask | None = None
    grammar_later: bool = False
    # Device LoRA slots (re)assigned since the last step: slot -> adapter to load
    # there before this step runs (engine/lora_slots.py).
    lora_loads: dict[int, LoRAAdapter] = field(default_factory=dict)

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


# One logprob entry: (token id, logprob, rank), the sampled token first, then the top k.
LogprobEntry = list[tuple[int, float, int]]


@dataclass
class ModelRunnerOutput:
    """What crosses back to the engine each step: a few ints (and floats) per sampling request."""

    request_ids: list[str]
    # Per request: its accepted tokens (one without proposals).
    sampled_token_ids: list[list[int]]
    # Per request: None, or one LogprobEntry per accepted token.
    logprobs: list[list[LogprobEntry] | None] | None = None
    # Requests with prompt_logprobs whose prompt this step computed: request id ->
    # (prompt position of the first entry, one LogprobEntry per position from
    # there, each for the prompt's own token at that position).
    prompt_logprobs: dict[str, tuple[int, list[LogprobEntry]]] | None = None

    @classmethod
    def empty(cls) -> ModelRunnerOutput:
        return cls([], [])

    def by_request(self) -> dict[str, list[int]]:
        return dict(zip(self.request_ids, self.sampled_token_ids))

    def logprobs_by_request(self) -> dict[str, list[LogprobEntry] | None]:
        return dict(zip(self.request_ids, self.logprobs)) if self.logprobs else {}


class PendingStep:
    """A step's result on its way (``result()`` waits for it). Worker groups
    return their own kinds; a ready one wraps a result already in hand."""

    def __init__(self, output: ModelRunnerOutput) -> None:
        self._output = output

    def result(self) -> ModelRunnerOutput:
        return self._output

    def supply_grammar(self, grammar: GrammarBitmask | None) -> None:
        """Sample a step launched with ``grammar_later`` under this bitmask."""
        raise RuntimeError(f"{type(self).__name__} does not take a grammar after launch")
