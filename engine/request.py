"""A request's state as the scheduler sees it: tokens, progress, blocks' hashes.

Prefill and decode are one thing here: the request has ``num_tokens`` (prompt
plus generated) and ``num_computed_tokens`` (those whose K/V sit in the cache);
each step closes part of the gap. The scheduler advances ``num_computed_tokens``
when it schedules a step. A step that samples leaves a *pending* token: it
counts in ``num_tokens`` (so the next step may already compute it, its value
taken on the device from the step before: asynchronous scheduling), but it is
not in ``token_ids`` until the step's result is back and ``append_token``
makes it real. Block hashes, stop checks and outputs only ever see real tokens.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from fleetlm.engine.block_hash import hash_prompt_blocks
from fleetlm.engine.step import LoRAAdapter
from fleetlm.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
}


@dataclass
class RequestTimes:
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        block_size: int,
        eos_token_ids: tuple[int, ...] = (),
        arrival_time: float | None = None,
        cache_key: str | None = None,
        prior_output_token_ids: list[int] | None = None,
        lora: LoRAAdapter | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = () if params.ignore_eos else eos_token_ids
        self.block_size = block_size
        self.lora = lora  # its LoRA adapter (None: the base model)
        # Extra key of the block hashes: KV computed under one adapter serves only that adapter.
        self.cache_key = lora.cache_key if lora is not None else cache_key
        # A request resumed elsewhere (migrated from a failed replica) starts
        # with the tokens it already produced: they count as output for
        # max_tokens, penalties and seeds, exactly as after a preemption.
        self.num_prior_output_tokens = len(prior_output_token_ids or ())
        self.token_ids = list(prompt_token_ids) + list(prior_output_token_ids or ())
        self.num_computed_tokens = 0
        self.num_pending_tokens = 0  # sampled by steps whose results are not back yet
        # Speculative decoding: tokens proposed for the next step to verify (set
        # by a proposer between steps), and how many the step in flight verifies.
        self.spec_token_ids: list[int] = []
        self.num_spec_in_flight = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first admission (-1 = not yet)
        self.grammar = None  # a guided request's grammar matcher (engine/structured_output.py)
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.times = RequestTimes(arrival=time.monotonic() if arrival_time is None else arrival_time)
        self.block_hashes: list[bytes] = hash_prompt_blocks(self.token_ids, block_size, self.cache_key)

    @property
    def num_tokens(self) -> int:
        """Real plus pending tokens: the tokens a step may schedule."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        """Real output tokens (pending ones excluded)."""
        return len(self.token_ids) - len(self.prompt_token_ids)

    def finishes_on_length_with_pending(self, max_model_len: int) -> bool:
        """True when a pending token will end the request on length (max_tokens or
        max_model_len), whatever its value: computing it would be wasted work."""
        if not self.num_pending_tokens:
            return False
        n_out = self.num_output_tokens + self.num_pending_tokens
        return n_out >= self.params.max_tokens or self.num_tokens >= max_model_len

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_token(self, token_id: int) -> None:
        """Make the oldest pending token real (or append one, for callers that schedule no steps)."""
        if self.num_pending_tokens:
            self.num_pending_tokens -= 1
        self.token_ids.append(token_id)
        if len(self.token_ids) % self.block_size == 0:
            parent = self.block_hashes[-1] if self.block_hashes else None
            start = len(self.block_hashes) * self.block_size
            self.block_hashes += hash_prompt_blocks(
                self.token_ids, self.block_size, self.cache_key, parent=parent, start=start
            )

    def drop_last_tokens(self, k: int) -> None:
        """Forget the last ``k`` output tokens of a finished request (a stop string
        matched before them, in a step that accepted several tokens)."""
        assert self.is_finished and 0 <= k <= self.num_output_tokens
        if k:
            del self.token_ids[-k:]
            del self.block_hashes[len(self.token_ids) // self.block_size :]

    def check_token_stop(self, max_model_len: int) -> RequestStatus | None:
        """Stops decided by the last token alone (stop strings are the detokenizer's)."""
        n_out = self.num_output_tokens
        last = self.token_ids[-1]
        if n_out >= self.params.min_tokens:
            if last in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if self.params.stop_token_ids and last in self.params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if n_out >= self.params.max_tokens or len(self.token_ids) >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.value}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens}, pending={self.num_pending_tokens})"
        )
