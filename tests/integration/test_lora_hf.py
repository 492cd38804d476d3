"""Multi-LoRA against transformers + PEFT, float32 on CPU: identical greedy tokens per adapter.

Three adapters made by ``peft`` on the embedded model (random non-zero A and
B; ranks 8, 4 with rsLoRA, 16; all seven projections, q/v only, o/gate/down)
and the base model, mixed in one batch of one engine with 2 device slots and
2 adapters in host memory (so adapters are swapped into slots and re-read
from disk mid-run), prefix caching on. Then: a second pass that hits the
prefix cache within each adapter and never across, preemption under a small
KV pool with small prefill chunks, refused adapters, and TP=3 over gloo.
"""

from __future__ import annotations

import pytest

from fleetlm import LLM, LoRARequest, SamplingParams
from fleetlm.engine.lora import LoRAAdapterError
from hf_reference import hf_model_from_source
from lora_adapters import RECIPES, make_peft_model, peft_greedy

pytestmark = pytest.mark.timeout(900)

MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
LONG = ("The history of computing is a story of people building machines to help them think. Early mechanical "
        "calculators could add and subtract; later designs stored programs and data in the same memory. ")
RAW = ["The capital of France is", "def fibonacci(n):\n    ", LONG + "In summary,", LONG * 2 + "The next step was"]
ENGINE = dict(enable_lora=True, max_loras=2, max_lora_rank=16, max_cpu_loras=2)


@pytest.fixture(scope="module")
def peft_setup(tmp_path_factory, embedded_model):
    from fleetlm.workers.loader import resolve_model

    hf = hf_model_from_source(resolve_model(embedded_model))
    return make_peft_model(hf, RECIPES, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def loras(peft_setup):
    _, paths = peft_setup
    return [None] + [LoRARequest(r.name, i + 1, paths[r.name]) for i, r in enumerate(RECIPES)]


@pytest.fixture(scope="module")
def llm(embedded_model):
    return LLM(model=embedded_model, async_scheduling=True, **ENGINE)


@pytest.fixture(scope="module")
def prompts(llm):
    tok = llm.get_tokenizer()
    ids = [tok.encode(p, add_special_tokens=False) for p in RAW]
    assert len(ids[3]) > 4 * 16  # several full KV blocks, shared by every adapter's copy of it
    return ids


@pytest.fixture(scope="module")
def cases(prompts, loras):
    """(prompt index, adapter) for every prompt under the base model and each adapter, interleaved."""
    return [(i, lora) for i in range(len(prompts)) for lora in loras]


@pytest.fixture(scope="module")
def reference(peft_setup, prompts, cases, llm):
    model, _ = peft_setup
    eos = list(llm.engine.model_config.eos_token_ids)
    by_adapter = {}  # one batched run per adapter, over its prompts
    for i, lora in cases:
        by_adapter.setdefault(lora.lora_name if lora else None, []).append(i)
    tokens = {}
    for name, idx in by_adapter.items():
        tokens.update({(i, name): t for i, t in zip(idx, peft_greedy(model, name, [prompts[i] for i in idx],
                                                                     MAX_TOKENS, eos))})
    return [tokens[i, lora.lora_name if lora else None] for i, lora in cases]


def _generate(llm, prompts, cases):
    return [o.outputs[0].token_ids for o in
            llm.generate([prompts[i] for i, _ in cases], GREEDY, lora_request=[lora for _, lora in cases])]


def _check(got, reference, cases):
    for (i, lora), g, ref in zip(cases, got, reference):
        assert g == ref, f"prompt {i} with {lora.lora_name if lora else 'the base model'}"


def test_mixed_adapters_and_base_in_one_batch_match_peft(llm, prompts, cases, reference, loras):
    got = _generate(llm, prompts, cases)
    _check(got, reference, cases)
    # Every adapter changes some output (the comparison is not base against base).
    base = {i: ref for (i, lora), ref in zip(cases, reference) if lora is None}
    for lora in loras[1:]:
        assert any(ref != base[i] for (i, l), ref in zip(cases, reference) if l == lora), lora.lora_name
    slots = llm.engine.scheduler.loras
    assert slots.num_loads >= 3 and slots.num_evictions >= 1  # 3 adapters through 2 slots
    assert llm.engine.num_steps_ahead > 0
    lora_manager = llm.engine.workers.worker.runner.lora
    assert lora_manager.num_disk_loads >= 3 and len(lora_manager.host) == 2


def test_prefix_cache_hits_within_an_adapter_never_across(llm, prompts, cases, reference, loras):
    stats0 = llm.engine.stats()
    outs = llm.generate([prompts[i] for i, _ in cases], GREEDY, lora_request=[lora for _, lora in cases])
    _check([o.outputs[0].token_ids for o in outs], reference, cases)
    hits = llm.engine.stats().prefix_cache_hit_tokens - stats0.prefix_cache_hit_tokens
    assert hits > 0 and all(o.num_cached_tokens > 0 for (i, _), o in zip(cases, outs) if i == 3)
    # The same adapter files under a new id are a new adapter: nothing cached for it yet.
    alias = LoRARequest("alias", 99, loras[1].lora_path)
    out = llm.generate([prompts[3]], GREEDY, lora_request=alias)[0]
    assert out.num_cached_tokens == 0
    assert out.outputs[0].token_ids == reference[cases.index((3, loras[1]))]


def test_preemption_and_small_chunks_keep_tokens(embedded_model, prompts, cases, reference):
    small = LLM(model=embedded_model, num_kv_blocks=20, max_num_seqs=8, max_num_batched_tokens=48,
                enable_prefix_caching=False, **ENGINE)
    got = _generate(small, prompts, cases)
    assert small.engine.scheduler.num_preemptions > 0
    _check(got, reference, cases)
    assert all(p == 0 for p in small.engine.scheduler.loras.pins)
    assert small.engine.idle_invariants()["ok"], small.engine.idle_invariants()


def test_bad_adapters_are_refused_with_their_reason(llm, peft_setup, tmp_path, prompts):
    from peft import LoraConfig

    model, _ = peft_setup
    for name, cfg in [("r32", LoraConfig(r=32, lora_alpha=32, target_modules=["q_proj"])),
                      ("head", LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))]:
        model.add_adapter(name, cfg)
        model.save_pretrained(str(tmp_path / name), selected_adapters=[name])
        model.delete_adapter(name)
    with pytest.raises(LoRAAdapterError, match=r"rank 32, above max_lora_rank \(16\)"):
        llm.generate([prompts[0]], GREEDY, lora_request=LoRARequest("r32", 50, str(tmp_path / "r32" / "r32")))
    with pytest.raises(LoRAAdapterError, match="targets 'lm_head', which FleetLM cannot apply"):
        llm.generate([prompts[0]], GREEDY, lora_request=LoRARequest("head", 51, str(tmp_path / "head" / "head")))
    with pytest.raises(LoRAAdapterError, match="no such directory"):
        llm.generate([prompts[0]], GREEDY, lora_request=LoRARequest("gone", 52, str(tmp_path / "gone")))
    assert not llm.engine.has_unfinished_requests()


def test_tp3_over_gloo_matches_peft(embedded_model, prompts, cases, reference):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    picked = [k for k, (i, _) in enumerate(cases) if i in (0, 3)]
    try:
        # 9 query heads, 3 KV heads: each rank keeps 3 and 1; its share of every A or B.
        tp = LLM(model=embedded_model, tensor_parallel_size=3, device="cpu", dtype="float32", max_model_len=512,
                 cpu_kv_cache_bytes=32 << 20, **ENGINE)
        try:
            got = _generate(tp, prompts, [cases[k] for k in picked])
        finally:
            tp.engine.shutdown()
    finally:
        ray.shutdown()
    _check(got, [reference[k] for k in picked], [cases[k] for k in picked])
