"""Warm-up before ready: real steps through every path serving will take.

On a GPU the first use of each kernel variant compiles it (Triton JIT: a few
seconds for the first request of a fresh replica, 166x its steady-state
latency on an H200). So before the engine is handed to a server, it runs
synthetic requests that take each path once:

- prefills of several lengths, up to a full step's token budget (the shapes
  Triton specializes on: 1, unaligned, multiples of 16, the chunk size);
- a prefill that reuses a cached prefix (attention over cached context);
- a step that mixes decodes with a new prefill chunk;
- decodes at batch sizes 1, 3, 16 and up to 64 (the GEMV at one row, the
  batched GEMMs, the sampler at each size class);
- every sampling path: greedy, temperature with top-p/top-k/min-p, the three
  penalties, seeded sampling, logprobs and prompt logprobs;
- structured output, when its grammar engine is installed: a guided request
  beside a free one builds the tokenizer's grammar table (1-2 s for a large
  vocabulary, which the first user of ``response_format`` would otherwise
  wait for) and takes the token-bitmask kernel and deferred sampling once.

Afterwards the prefix cache is emptied and the counters the metrics read are
zeroed, so the warm-up leaves no trace a client or an operator could see. The
whole warm-up is bounded by ``time_limit_s``: past it the remaining requests
are aborted (and the warm-up reports it did not finish).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import random
import time
from dataclasses import dataclass, field

from fleetlm.engine.sampling_params import GuidedDecodingParams, SamplingParams

SAMPLING_VARIANTS = (
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=40, min_p=0.05),
    SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1),
    SamplingParams(temperature=0.7, seed=1),
    SamplingParams(temperature=0.0, logprobs=5, prompt_logprobs=2),
)


@dataclass
class WarmupReport:
    seconds: float = 0.0
    requests: int = 0
    steps: int = 0
    finished: bool = True  # False: the time limit cut it short
    phases: dict[str, float] = field(default_factory=dict)  # seconds per path


class _Warmup:
    def __init__(self, engine, time_limit_s: float) -> None:
        self.engine = engine
        self.deadline = time.monotonic() + time_limit_s
        self.report = WarmupReport()
        self.rng = random.Random(0)
        self.vocab = max(2, min(engine.model_config.vocab_size, 32000))

    def prompt(self, length: int) -> list[int]:
        return [self.rng.randrange(1, self.vocab) for _ in range(length)]

    def run(self, name: str, specs, late=()) -> None:
        """Run ``specs`` (prompt ids, params) to completion; ``late`` join after the first step."""
        if time.monotonic() > self.deadline:
            self.report.finished = False
            return
        t, ids = time.monotonic(), []
        for prompt, params in specs:
            ids.append(self._add(prompt, params))
        first = True
        while self.engine.has_unfinished_requests():
            if time.monotonic() > self.deadline:
                for rid in ids:
                    self.engine.abort_request(rid)
                self.report.finished = False
            self.engine.step()
            self.report.steps += 1
            if first:
                ids += [self._add(prompt, params) for prompt, params in late]
                first = False
        self.report.phases[name] = time.monotonic() - t

    def _add(self, prompt: list[int], params: SamplingParams) -> str:
        rid = f"warmup-{self.report.requests}"
        self.report.requests += 1
        self.engine.add_request(rid, prompt, params)
        return rid


def warm_up(engine, time_limit_s: float = 300.0) -> WarmupReport:
    """Take every serving path once (see the module docstring); leave no state behind."""
    t0 = time.monotonic()
    w = _Warmup(engine, time_limit_s)
    sc = engine.config.scheduler
    room = sc.max_model_len - 8  # prompt + the few tokens each request generates
    budget = min(sc.max_num_batched_tokens, room)
    block = engine.config.cache.block_size
    one = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    four = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    w.run("prefill", [(w.prompt(n), one) for n in sorted({1, 15, 16, 17, 100, budget}) if 0 < n <= room])
    shared = w.prompt(min(3 * block + 5, room))
    w.run("prefix_store", [(shared, one)])
    w.run("prefix_hit", [(shared, one)])  # its full blocks come from the prefix cache now
    w.run("mixed", [(w.prompt(min(32, room)), four)] * 2, late=[(w.prompt(max(1, budget // 2)), one)])
    for bs in sorted({b for b in (1, 3, 16, 64) if b <= sc.max_num_seqs}):
        w.run(f"decode_bs{bs}", [(w.prompt(min(8, room)), four) for _ in range(bs)])
    variants = [(w.prompt(min(12, room)), dataclasses.replace(p, max_tokens=3, ignore_eos=True))
                for p in SAMPLING_VARIANTS]
    w.run("sampling_batch", variants)
    for i, spec in enumerate(variants):  # each alone: the batch-1 path of each
        w.run(f"sampling_{i}", [spec])
    if importlib.util.find_spec("xgrammar") is not None:
        guided = SamplingParams(temperature=0.0, max_tokens=4, guided_decoding=GuidedDecodingParams(json_object=True))
        w.run("guided", [(w.prompt(min(12, room)), guided), (w.prompt(min(12, room)), four)])
    engine.reset_after_warmup()
    w.report.seconds = time.monotonic() - t0
    return w.report
