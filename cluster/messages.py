"""The messages between the ingress and an ``LLMReplica`` (they cross Ray, so plain dataclasses).

The ingress sends a :class:`GenerateRequest` (token ids, ``SamplingParams``);
the replica streams back :class:`GenerateChunk` messages holding, per choice,
only what is new since the previous chunk (:class:`ChoiceDelta`), or an
in-band :class:`ReplicaError`. The control plane answers with
:class:`ModelInfo` and :class:`ReplicaHealth`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TokenLogprob:
    """One token's logprob and its top alternatives (decoded strings)."""

    token_id: int
    token: str
    logprob: float | None  # None: a prompt's first token (nothing before it to score it)
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: Any  # fleetlm.engine.sampling_params.SamplingParams
    # Prefix block hash ids of the prompt, for a prefix-aware request router.
    block_hash_ids: tuple[int, ...] = ()
    # A migrated sequence (cluster/migration.py): the output tokens the client
    # already has, and the length of the text it already has; continue after them.
    resume_token_ids: tuple[int, ...] = ()
    resume_text_len: int = 0
    # 0 for a new request; k for its k-th re-submission after a replica failed
    # (admitted once already: no replica-side queue limit applies).
    attempt: int = 0
    # The LoRA adapter it runs with (fleetlm.engine.lora.LoRARequest), None for the
    # base model; it travels with the request when it migrates.
    lora_request: Any = None


@dataclass
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(frozen=True)
class ReplicaError:
    kind: str  # an errors._KINDS name: "invalid_request", "queue_full", "unavailable", "internal"
    message: str
    param: str | None = None
    # The replica cannot serve anything (its engine died): the ingress moves
    # the request to another replica instead of failing it.
    retryable: bool = False
    # The engine was already dead when the request arrived (it was routed to a
    # replica about to end itself): the request did not take an engine down.
    dead_on_arrival: bool = False


@dataclass
class GenerateChunk:
    choices: list[ChoiceDelta] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    finished: bool = False
    error: ReplicaError | None = None
    # The prompt's own logprobs (``SamplingParams.prompt_logprobs``), once, in the
    # stream's first chunk with output: one entry per prompt token.
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_model_len: int
    block_size: int
    vocab_size: int
    tokenizer: Any  # the engine's own tokenizer, so the ingress counts tokens the same way
    max_num_seqs: int = 0  # running-batch seats per replica (ingress admission)
    tool_call_parser: str | None = None  # tool calling (cluster/tool_calling.py)
    enable_auto_tool_choice: bool = False


@dataclass(frozen=True)
class ReplicaHealth:
    replica: str
    healthy: bool
    message: str = ""


__all__ = ["ChoiceDelta", "GenerateChunk", "GenerateRequest", "ModelInfo", "ReplicaError", "ReplicaHealth",
           "TokenLogprob"]
