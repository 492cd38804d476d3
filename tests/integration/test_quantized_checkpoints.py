"""AWQ, GPTQ and GGUF checkpoints of the embedded model: FleetLM's greedy tokens equal transformers'.

Each checkpoint is written here in the layout its tool writes
(``int4_checkpoints.py``); transformers runs the format's float32
dequantization of the same integers. FleetLM must give the same greedy
tokens, 4 prompts x 32, on one device and at TP=3 (9 query / 3 KV heads
over 3 gloo ranks; 576 and 1536 input features split into whole groups of
64 or whole GGUF blocks). On a quiet 2-core machine about 4 minutes (9 tests).
"""

from __future__ import annotations

import pytest
import ray

from fleetlm import LLM, SamplingParams
from hf_reference import hf_greedy_batch, hf_model_from_source
from int4_checkpoints import hf_model_from_weights, write_checkpoint, write_gguf
from fleetlm.workers.loader import resolve_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):", "Once upon a time"]
ENGINE = dict(device="cpu", dtype="float32", max_model_len=256, cpu_kv_cache_bytes=32 << 20)
# TP=3 (a Ray group of three gloo ranks each time) where the sharding differs: AWQ packs along the
# output features, GPTQ with desc_act carries g_idx across shards, one group per row splits none.
CHECKPOINTS = {
    "awq-g64": ("awq", dict(group=64), True),
    "gptq-sym-g64": ("gptq", dict(group=64, sym=True), False),
    "gptq-asym-g64-act": ("gptq", dict(group=64, desc_act=True), True),
    "gptq-asym-g32": ("gptq", dict(group=32), False),
    "gptq-sym-act-8bit": ("gptq", dict(bits=8, group=64, sym=True, desc_act=True), False),
    "gptq-asym-per-row": ("gptq", dict(group=-1), True),
}
# GGUF files: one projection type per stem; K-quants fit only ffn_down (1536 inputs; 576 is not whole 256s).
GGUF_FILES = {
    "mixed-q4k": ({"attn_q": "Q4_0", "attn_k": "Q8_0", "attn_v": "Q4_1", "attn_output": "Q4_1", "ffn_gate": "Q8_0",
                   "ffn_up": "Q4_0", "ffn_down": "Q4_K"}, True),
    "q5k": ({"ffn_down": "Q5_K"}, False),
    "q6k": ({"ffn_down": "Q6_K"}, False),
}


def _generate(model: str, **kw) -> list[list[int]]:
    llm = LLM(model=model, **ENGINE, **kw)
    try:
        return [(o.prompt_token_ids, o.outputs[0].token_ids) for o in llm.generate(PROMPTS, GREEDY)]
    finally:
        llm.engine.shutdown()


def _check_against_transformers(hf, ours) -> None:
    # As ignore_eos: 32 tokens each, EOS included when it wins.
    reference = hf_greedy_batch(hf, [prompt_ids for prompt_ids, _ in ours], 32, None)
    for (_, tokens), (expected, _) in zip(ours, reference):
        assert tokens == expected


@pytest.fixture(scope="module")
def ray_tp():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    method, kw, tp3 = CHECKPOINTS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    reference = write_checkpoint(path, method, **kw)
    return str(path), reference, tp3


def test_int_checkpoint_matches_transformers(checkpoint, ray_tp):
    path, reference, tp3 = checkpoint
    ours = _generate(path)
    _check_against_transformers(hf_model_from_weights(resolve_model(path).hf_config, reference), ours)
    if tp3:
        assert _generate(path, tensor_parallel_size=3) == ours


@pytest.mark.parametrize("name", sorted(GGUF_FILES))
def test_gguf_kept_quantized_matches_transformers(name, tmp_path, ray_tp):
    types, tp3 = GGUF_FILES[name]
    path = tmp_path / f"{name}.gguf"
    write_gguf(path, types)
    ours = _generate(str(path), quantization="gguf")
    _check_against_transformers(hf_model_from_source(resolve_model(str(path))), ours)
    if tp3:
        assert _generate(str(path), quantization="gguf", tensor_parallel_size=3) == ours
