"""Weights kept quantized on the GPU: the embedded GGUF (Q4_1) runs its blocks by default, with the CPU's tokens."""

import pytest
import torch

from fleetlm import LLM, SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):", "Once upon a time"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def _tokens(**kw):
    llm = LLM(model="smollm2-135m-instruct", dtype="float32", max_model_len=256, **kw)
    try:
        return llm.engine.config.model.quantization, [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    finally:
        llm.engine.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_embedded_gguf_runs_quantized_by_default_on_gpu():
    cpu_quant, cpu = _tokens(device="cpu", cpu_kv_cache_bytes=32 << 20)
    gpu_quant, gpu = _tokens(device="cuda", enforce_eager=True)
    assert (cpu_quant, gpu_quant) == (None, "gguf")
    # float32 on both; only the order of sums differs: the first tokens agree.
    assert [t[:8] for t in gpu] == [t[:8] for t in cpu]
