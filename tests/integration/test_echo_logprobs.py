"""``/v1/completions`` with ``echo`` and ``logprobs``: the prompt scored, as evaluation harnesses ask.

The real embedded model behind the real ingress (``OpenAIServer`` over an
``LLMReplica`` wrapping an ``AsyncEngine``, in this process: no Ray), asked
through the official ``openai`` client the way lm-evaluation-harness scores a
continuation (``echo=True, logprobs=1, max_tokens=1, temperature=0``). The
prompt's logprobs must be the offline engine's ``prompt_logprobs``, token
for token; streamed and whole responses must agree.
"""

from __future__ import annotations

import asyncio
import math

import httpx
import openai
import pytest

from fleetlm import LLM, SamplingParams
from fleetlm.cluster.replica import LLMReplica
from fleetlm.cluster.serve_config import ModelDeploymentConfig, ServeAppConfig
from fleetlm.cluster.server import OpenAIServer, create_app
from fleetlm.engine.async_engine import AsyncEngine

PROMPTS = ["The capital of France is Paris", "Water boils at one hundred degrees"]
K = 2


class LocalBackend:
    """A ModelBackend over one in-process replica (what a Serve handle reaches)."""

    def __init__(self, name: str, replica: LLMReplica) -> None:
        self.name, self.replica = name, replica

    async def info(self):
        return self.replica.model_info()

    def cached_info(self):
        return self.replica.model_info()

    def generate(self, req):
        agen = self.replica.generate(req)

        class Stream:
            def __aiter__(self):
                return agen

            def cancel(self):
                asyncio.ensure_future(agen.aclose())

        return Stream()

    async def health(self):
        return [self.replica.health()]

    async def metrics(self):
        return [self.replica.metrics_families()]


@pytest.fixture(scope="module")
def llm(embedded_model):
    llm = LLM(model=embedded_model, device="cpu", dtype="float32", max_model_len=256, max_num_seqs=8,
              enable_prefix_caching=True)
    yield llm
    llm.engine.shutdown()


def _offline(llm, prompt: str) -> tuple[list[int], list]:
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=K))[0]
    return out.prompt_token_ids, out.prompt_logprobs


def test_echo_logprobs_match_the_offline_engines_prompt_logprobs(llm, embedded_model):
    reference = [_offline(llm, p) for p in PROMPTS]

    async def go():
        engine = AsyncEngine(llm.engine)
        try:
            replica = LLMReplica(ModelDeploymentConfig(model=embedded_model), 64, engine=engine)
            server = OpenAIServer(ServeAppConfig(), {"m": LocalBackend("m", replica)})
            transport = httpx.ASGITransport(app=create_app(server))
            http = httpx.AsyncClient(transport=transport, base_url="http://t/v1")
            client = openai.AsyncOpenAI(api_key="x", base_url="http://t/v1", http_client=http)
            whole = await client.completions.create(model="m", prompt=PROMPTS, echo=True, logprobs=K,
                                                    max_tokens=1, temperature=0)
            streamed = []
            for p in PROMPTS:
                events = await client.completions.create(model="m", prompt=p, echo=True, logprobs=K, max_tokens=1,
                                                         temperature=0, stream=True)
                streamed.append([e async for e in events])
            await http.aclose()
            return whole, streamed
        finally:
            await engine.shutdown()

    whole, streamed = asyncio.run(go())
    tok = llm.get_tokenizer()
    for prompt, (ids, lps), choice, events in zip(PROMPTS, reference, whole.choices, streamed):
        lp = choice.logprobs
        n = len(ids)
        assert choice.text.startswith(prompt)
        assert len(lp.tokens) == n + 1  # the prompt's tokens, then the one generated
        assert lp.tokens[:n] == [tok.decode([t], skip_special_tokens=False) for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing scores the first token
        for p in range(1, n):
            assert lp.token_logprobs[p] == pytest.approx(lps[p][ids[p]].logprob, abs=1e-5), p
            top = {e.decoded_token: e.logprob for t, e in lps[p].items() if e.rank is not None and e.rank <= K}
            assert lp.top_logprobs[p] == pytest.approx(top, abs=1e-5), p
            assert math.isfinite(lp.token_logprobs[p]) and lp.token_logprobs[p] <= 0
        assert lp.text_offset[:n] == [sum(len(t) for t in lp.tokens[:p]) for p in range(n)]
        # Streamed: the first event carries the echo and the prompt's logprobs; all together = the whole.
        first = events[0].choices[0]
        assert first.text.startswith(prompt)
        got = [t for e in events for c in e.choices if c.logprobs for t in c.logprobs.token_logprobs]
        assert [t for e in events for c in e.choices if c.logprobs for t in c.logprobs.tokens] == lp.tokens
        # One prompt alone vs two in one batch: float32 sums in another order.
        assert got[0] is None and got[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
