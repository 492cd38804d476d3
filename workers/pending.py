"""A launched step's sampled tokens on their way to the host, and what they accept.

The device->host copies are queued behind the step at launch, into pinned
memory, followed by an event; ``result()`` waits for that event only, then
turns the per-position samples into each request's accepted tokens
(``engine/step.py``): a request that verified proposals keeps those its
samples agree with, then the sample after the last agreed one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.engine.step import ModelRunnerOutput, PendingStep


@dataclass
class ReqState:
    """What a worker keeps of a request between steps."""

    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)  # read back so far
    num_sampled: int = 0  # output tokens sampled so far, including those of steps not read back yet


def accept(samples: list[int], proposals: list[int]) -> list[int]:
    """The accepted tokens of one request: its proposals up to the first its samples
    disagree with, then the sample at that position (``len(samples) == 1 + len(proposals)``).

    Sampling each position from the target's own distribution and keeping
    the agreeing prefix is exact rejection sampling when the proposals are
    deterministic (n-gram lookups, greedy drafts): a proposal is kept with
    the target's probability of it, and a disagreeing sample is distributed
    as the target's distribution without the proposal.
    """
    n = 0
    while n < len(proposals) and samples[n] == proposals[n]:
        n += 1
    return samples[: n + 1]


class PendingOutput(PendingStep):
    """One step's samples: ``rows[i]`` is the first sample row of request ``i``,
    which has ``len(proposals[i])`` more after it."""

    def __init__(self, req_ids: list[str], states: list[ReqState], proposals: list[list[int]],
                 tensors: list[torch.Tensor], prompt: list | None = None) -> None:
        self.req_ids, self.states, self.proposals = req_ids, states, proposals
        self._output: ModelRunnerOutput | None = None
        self._event = None
        # Prompt logprobs: (request id, first position, [ids, logprobs, ranks]) per request.
        self._prompt_meta = [(rid, first) for rid, first, _ in prompt or ()]
        flat = tensors + [t for _, _, ts in prompt or () for t in ts]
        if flat and flat[0].is_cuda:
            pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in flat]
            flat = [p.copy_(t, non_blocking=True) for p, t in zip(pinned, flat)]
            self._event = torch.cuda.Event()
            self._event.record()
        self._host = flat[: len(tensors)]  # [sampled] or [sampled, logprob ids, logprobs, ranks], one row per position
        self._prompt_host = flat[len(tensors):]

    @classmethod
    def ready(cls, output: ModelRunnerOutput) -> PendingOutput:
        pending = cls([], [], [], [])
        pending._output = output
        return pending

    def result(self) -> ModelRunnerOutput:
        if self._output is None:
            if self._event is not None:
                self._event.synchronize()
            samples = self._host[0].tolist() if self._host else []
            accepted, row = [], 0
            firsts = []
            for st, props in zip(self.states, self.proposals):
                tokens = accept(samples[row : row + 1 + len(props)], props)
                # States are the launch's objects: a request that ended meanwhile
                # (its state dropped, its id perhaps reused) takes nothing here.
                st.output_token_ids.extend(tokens)
                st.num_sampled += len(tokens) - 1  # the launch counted one
                accepted.append(tokens)
                firsts.append(row)
                row += 1 + len(props)
            self._output = ModelRunnerOutput(self.req_ids, accepted, self._logprobs(firsts, accepted),
                                             self._prompt_logprobs())
            self._host = self._prompt_host = []
        return self._output

    def _prompt_logprobs(self):
        if not self._prompt_meta:
            return None
        found = {}
        for j, (rid, first) in enumerate(self._prompt_meta):
            ids, lps, ranks = (t.tolist() for t in self._prompt_host[3 * j : 3 * j + 3])
            found[rid] = (first, [[(i[0], lp[0], r)] + [(i[c], lp[c], c) for c in range(1, len(i))]
                                  for i, lp, r in zip(ids, lps, ranks)])
        return found

    def _logprobs(self, firsts: list[int], accepted: list[list[int]]):
        if len(self._host) <= 1:
            return None
        ids, lps, ranks = (t.tolist() for t in self._host[1:])
        result = []
        for st, first, tokens in zip(self.states, firsts, accepted):
            k = st.params.logprobs
            if k is None:
                result.append(None)
                continue
            entries = []
            for r in range(first, first + len(tokens)):
                row = [(ids[r][0], lps[r][0], ranks[r])]
                row += [(ids[r][j], lps[r][j], j) for j in range(1, k + 1)]
                entries.append(row)
            result.append(entries)
        return result


class DeferredSampling(PendingStep):
    """A launched step whose forward pass is queued and whose sampling waits for its
    grammar bitmask (built from the step before, once that step's tokens are back)."""

    def __init__(self, sample) -> None:
        self._sample = sample  # grammar -> PendingOutput
        self._pending: PendingOutput | None = None

    @property
    def sampled(self) -> bool:
        return self._pending is not None

    def supply_grammar(self, grammar) -> None:
        if self._pending is not None:
            raise RuntimeError("this step already got its grammar")
        self._pending, self._sample = self._sample(grammar), None

    def result(self) -> ModelRunnerOutput:
        if self._pending is None:
            raise RuntimeError("a step launched with grammar_later was never given its grammar")
        return self._pending.result()
