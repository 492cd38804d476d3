"""AsyncEngine.generate's coalescing: fewer, larger outputs on request; nothing lost; the final one at once."""

import asyncio
import time
from types import SimpleNamespace

from fleetlm.engine.async_engine import AsyncEngine
from fleetlm.engine.outputs import CompletionOutput, RequestOutput

STEP_S = 0.01


class TickingEngine:
    """LLMEngine's surface for AsyncEngine: every step (10 ms) adds one token to each request."""

    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens
        self.tokenizer = self.model_config = None
        self.config = SimpleNamespace()
        self.tokens: dict[str, list[int]] = {}
        self.startup_seconds: dict[str, float] = {}
        self.finished_at: dict[str, float] = {}

    def make_group(self, request_id, prompt, params, prior_output_token_ids=None):
        return SimpleNamespace(request_id=request_id, prompt=list(prompt))

    def add_group(self, group):
        self.tokens[group.request_id] = []

    def abort_request(self, request_id):
        self.tokens.pop(request_id, None)

    def has_unfinished_requests(self):
        return bool(self.tokens)

    def step(self):
        time.sleep(STEP_S)
        outs = []
        for rid, toks in list(self.tokens.items()):
            toks.append(len(toks))
            done = len(toks) == self.num_tokens
            outs.append(RequestOutput(rid, None, [1], [CompletionOutput(0, "", list(toks),
                                                                        finish_reason="length" if done else None)],
                                      finished=done))
            if done:
                del self.tokens[rid]
                self.finished_at[rid] = time.monotonic()
        return outs

    def shutdown(self):
        pass


async def _collect(engine: AsyncEngine, coalesce_s):
    got = []
    async for out in engine.generate([1], None, "r", coalesce_s=coalesce_s):
        got.append((time.monotonic(), list(out.outputs[0].token_ids), out.finished))
    return got


def _run(num_tokens, coalesce_s):
    core = TickingEngine(num_tokens)
    engine = AsyncEngine(core)
    try:
        got = asyncio.run(_collect(engine, coalesce_s))
    finally:
        asyncio.run(engine.shutdown())
    return core, got


def test_coalescing_merges_outputs_and_loses_nothing():
    core, got = _run(30, lambda: 0.06)  # ~300 ms of tokens, chunks >= 60 ms apart
    assert got[-1][1] == list(range(30)) and got[-1][2]
    assert [t for _, toks, _ in got for t in toks[:1]] == [0] * len(got)  # cumulative from the start
    assert len(got) <= 8, f"{len(got)} outputs for 30 tokens 60 ms apart"
    gaps = [b[0] - a[0] for a, b in zip(got[:-1], got[1:-1])]
    assert all(g >= 0.055 for g in gaps), gaps
    # The final output is not held back by the interval.
    assert got[-1][0] - core.finished_at["r"] < 0.04


def test_without_coalescing_every_step_is_seen():
    _, got = _run(20, None)
    assert got[-1][1] == list(range(20))
    assert len(got) >= 15  # one per 10 ms step (a busy loop may merge a few)
