"""A launched step's sampled tokens on their way to the host, and what they accept.

The device->host copies are queued behind the step at launch, into pinned
memory, followed by an event; ``result()`` waits for that event only, then
turns the per-row tokens into each request's accepted tokens
(``engine/step.py``): a request that verified ``m`` proposals owns ``m + 1``
rows and keeps the tokens of its leading accepting rows plus the next row's
(``workers/spec_verify.py`` decides which rows accept, on the device).
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


class PendingOutput(PendingStep):
    """One step's rows: ``tokens[r]`` is row r's token; request ``i``'s rows start at the
    sum of ``1 + len(proposals[j])`` over the requests before it. ``accepted[r]`` (with
    proposals): whether row r's proposal is accepted. ``logprobs``: [ids, logprobs, ranks]
    per row. ``drafted``: the draft model's proposals for the next step, ([rows, k] tensor,
    [(request index, count)] per row)."""

    def __init__(self, req_ids: list[str], states: list[ReqState], proposals: list[list[int]],
                 tokens: torch.Tensor | None = None, accepted: torch.Tensor | None = None,
                 logprobs: list[torch.Tensor] | None = None, prompt: list | None = None,
                 drafted: tuple[torch.Tensor, list[tuple[int, int]]] | None = None) -> None:
        self.req_ids, self.states, self.proposals = req_ids, states, proposals
        self._output: ModelRunnerOutput | None = None
        self._event = None
        # Prompt logprobs: (request id, first position, [ids, logprobs, ranks]) per request.
        self._prompt_meta = [(rid, first) for rid, first, _ in prompt or ()]
        self._drafted_rows = drafted[1] if drafted is not None else None
        named = {"tokens": tokens, "accepted": accepted, "drafted": drafted[0] if drafted is not None else None}
        for i, t in enumerate(logprobs or ()):
            named[f"lp{i}"] = t
        for j, (_, _, ts) in enumerate(prompt or ()):
            for i, t in enumerate(ts):
                named[f"prompt{j}.{i}"] = t
        named = {k: t for k, t in named.items() if t is not None}
        if named and next(iter(named.values())).is_cuda:
            pinned = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for k, t in named.items()}
            named = {k: pinned[k].copy_(t, non_blocking=True) for k, t in named.items()}
            self._event = torch.cuda.Event()
            self._event.record()
        self._host = named

    @classmethod
    def ready(cls, output: ModelRunnerOutput) -> PendingOutput:
        pending = cls([], [], [])
        pending._output = output
        return pending

    def result(self) -> ModelRunnerOutput:
        if self._output is None:
            if self._event is not None:
                self._event.synchronize()
            host = self._host
            tokens = host["tokens"].tolist() if "tokens" in host else []
            flags = host["accepted"].tolist() if "accepted" in host else None
            accepted, firsts, row = [], [], 0
            for st, props in zip(self.states, self.proposals):
                n = 0
                while flags is not None and n < len(props) and flags[row + n]:
                    n += 1
                got = tokens[row : row + n + 1]
                # States are the launch's objects: a request that ended meanwhile
                # (its state dropped, its id perhaps reused) takes nothing here.
                st.output_token_ids.extend(got)
                st.num_sampled += len(got) - 1  # the launch counted one
                accepted.append(got)
                firsts.append(row)
                row += 1 + len(props)
            self._output = ModelRunnerOutput(self.req_ids, accepted, self._logprobs(firsts, accepted),
                                             self._prompt_logprobs(), self._drafted())
            self._host = {}
        return self._output

    def _drafted(self) -> list[list[int]] | None:
        if self._drafted_rows is None:
            return None
        table = self._host["drafted"].tolist()
        found = [[] for _ in self.req_ids]
        for row, (i, count) in zip(table, self._drafted_rows):
            found[i] = row[:count]
        return found

    def _prompt_logprobs(self):
        if not self._prompt_meta:
            return None
        found = {}
        for j, (rid, first) in enumerate(self._prompt_meta):
            ids, lps, ranks = (self._host[f"prompt{j}.{i}"].tolist() for i in range(3))
            found[rid] = (first, [[(i[0], lp[0], r)] + [(i[c], lp[c], c) for c in range(1, len(i))]
                                  for i, lp, r in zip(ids, lps, ranks)])
        return found

    def _logprobs(self, firsts: list[int], accepted: list[list[int]]):
        if "lp0" not in self._host:
            return None
        ids, lps, ranks = (self._host[f"lp{i}"].tolist() for i in range(3))
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
