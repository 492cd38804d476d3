"""Guided decoding through Ray worker groups (CPU, gloo, float32): the same tokens as one device.

With one pipeline stage the engine launches steps ahead; a guided step's masks then follow it
as a message of their own on the shared-memory ring (``LateGrammar``), or, by Ray calls, the
step waits for them; TP ranks other than 0 take the sampled ids from rank 0. Pipeline stages
run synchronously, with the masks inside the step.
"""

from __future__ import annotations

import pytest

import ray

from fleetlm import LLM, GuidedDecodingParams, SamplingParams
from fleetlm.workers import worker_group
from fleetlm.workers.ray_group import RayWorkerGroup

pytestmark = pytest.mark.timeout(900)

SMOL = dict(model="smollm2-135m-instruct", device="cpu", dtype="float32", max_model_len=256, cpu_kv_cache_bytes=32 << 20)
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "days"]}
GUIDED = [GuidedDecodingParams(json=SCHEMA, disable_any_whitespace=True), GuidedDecodingParams(regex=r"[A-Z][a-z]{2,7}"),
          None, GuidedDecodingParams(choice=["yes", "no", "maybe"])]
PROMPTS = ["Plan a trip as JSON.", "Name a city:", "Tell me a fact.", "Is the sky green?"]


def params():
    return [SamplingParams(temperature=0.0, max_tokens=24, guided_decoding=g, ignore_eos=g is None) for g in GUIDED]


def run(**kw) -> tuple[list[list[int]], int]:
    llm = LLM(**SMOL, **kw)
    try:
        prompts = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
        outs = llm.generate(prompts, params())
        return [o.outputs[0].token_ids for o in outs], llm.engine.num_steps_ahead
    finally:
        llm.engine.shutdown()


@pytest.fixture(scope="module")
def reference():
    tokens, _ = run(async_scheduling=False)
    return tokens


@pytest.fixture(scope="module")
def ray_local():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("transport", ["ring", "ray"])
def test_tp_steps_launched_ahead_take_their_masks_late(ray_local, reference, monkeypatch, transport):
    monkeypatch.setattr(worker_group, "create_worker_group", lambda config: RayWorkerGroup(config, transport=transport))
    tokens, ahead = run(tensor_parallel_size=3, async_scheduling=True)
    assert ahead > 0
    assert tokens == reference


def test_pipeline_stages_take_masks_with_the_step(ray_local, reference):
    tokens, _ = run(pipeline_parallel_size=2)
    assert tokens == reference
