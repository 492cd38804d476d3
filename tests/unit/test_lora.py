"""Multi-LoRA on the engine's side, torch-free: adapter checks (engine/lora.py), device slots
(engine/lora_slots.py) and the scheduler's cap on the adapters of a step, fairness, preemption."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from fleetlm.engine.args import EngineArgs
from fleetlm.engine.block_hash import hash_prompt_blocks
from fleetlm.engine.config import CacheConfig, LoRAConfig, ModelConfig, SchedulerConfig
from fleetlm.engine.lora import LoRAAdapterError, LoRARegistry, LoRARequest, read_adapter
from fleetlm.engine.lora_slots import SLOT_WAIT_STEPS, LoRASlots
from fleetlm.engine.request import Request
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.engine.scheduler import Scheduler
from fleetlm.engine.step import LoRAAdapter

HF = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
      "intermediate_size": 96, "vocab_size": 100, "max_position_embeddings": 512}
MODEL = ModelConfig(model="tiny", served_name="tiny", kind="dummy", path=None, hf_config=HF, dtype="float32",
                    max_model_len=512)
SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64), "gate_proj": (64, 96),
          "up_proj": (64, 96), "down_proj": (96, 64)}


def write_adapter(path, r=4, targets=("q_proj", "v_proj"), layers=(0, 1), config=None, tensors=None):
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets), "bias": "none",
           "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}
    cfg.update(config or {})
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is None:
        tensors = {}
        for i in layers:
            for t in targets:
                block = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                d_in, d_out = SHAPES[t]
                key = f"base_model.model.model.layers.{i}.{block}.{t}"
                tensors[f"{key}.lora_A.weight"] = np.ones((r, d_in), np.float32)
                tensors[f"{key}.lora_B.weight"] = np.ones((d_out, r), np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return str(path)


CFG = LoRAConfig(max_loras=2, max_lora_rank=8, max_cpu_loras=4)


def test_engine_side_imports_no_torch():
    code = ("import sys; import fleetlm.engine.lora, fleetlm.engine.lora_slots, fleetlm.engine.scheduler; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_peft_adapter_is_read_without_its_tensors(tmp_path):
    path = write_adapter(tmp_path / "a", r=4, targets=("q_proj", "k_proj", "gate_proj", "down_proj"))
    spec = read_adapter(LoRARequest("a", 1, path), MODEL, CFG)
    assert spec.rank == 4 and spec.scaling == 2.0 and spec.num_tensors == 16
    assert spec.targets == {"q_proj", "k_proj", "gate_proj", "down_proj"}
    rs = write_adapter(tmp_path / "rs", r=4, config={"use_rslora": True})
    assert read_adapter(LoRARequest("rs", 2, rs), MODEL, CFG).scaling == 8 / 2  # alpha / sqrt(r)


@pytest.mark.parametrize("mutate,match", [
    (lambda p: (p / "adapter_config.json").unlink(), "no adapter_config.json"),
    (lambda p: (p / "adapter_config.json").write_text("{nope"), "not valid JSON"),
    (lambda p: (p / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x00" * 4), "not a safetensors file"),
])
def test_broken_adapter_directories_are_named(tmp_path, mutate, match):
    path = write_adapter(tmp_path / "a")
    mutate(tmp_path / "a")
    with pytest.raises(LoRAAdapterError, match=match):
        read_adapter(LoRARequest("a", 1, path), MODEL, CFG)


def test_adapters_the_engine_cannot_run_are_refused(tmp_path):
    with pytest.raises(LoRAAdapterError, match="no such directory"):
        read_adapter(LoRARequest("x", 1, str(tmp_path / "missing")), MODEL, CFG)
    high = write_adapter(tmp_path / "high", r=16)
    with pytest.raises(LoRAAdapterError, match=r"rank 16, above max_lora_rank \(8\)"):
        read_adapter(LoRARequest("high", 1, high), MODEL, CFG)
    for key, value, match in [("bias", "all", "bias 'all'"), ("use_dora", True, "use_dora"),
                              ("rank_pattern", {"q_proj": 2}, "rank_pattern"), ("peft_type", "IA3", "IA3"),
                              ("modules_to_save", ["lm_head"], "modules_to_save")]:
        bad = write_adapter(tmp_path / key, config={key: value})
        with pytest.raises(LoRAAdapterError, match=match):
            read_adapter(LoRARequest(key, 1, bad), MODEL, CFG)
    listed = write_adapter(tmp_path / "listed", config={"target_modules": ["q_proj", "embed_tokens"]})
    with pytest.raises(LoRAAdapterError, match="targets 'embed_tokens', which FleetLM cannot apply"):
        read_adapter(LoRARequest("listed", 1, listed), MODEL, CFG)
    head = write_adapter(tmp_path / "head", config={"target_modules": "lm_head"}, tensors={
        "base_model.model.lm_head.lora_A.weight": np.ones((4, 64), np.float32),
        "base_model.model.lm_head.base_layer.weight": np.ones((100, 64), np.float32)})
    with pytest.raises(LoRAAdapterError, match="adapts 'lm_head'.*must be among q_proj"):
        read_adapter(LoRARequest("head", 1, head), MODEL, CFG)
    deep = write_adapter(tmp_path / "deep", layers=(0, 5))
    with pytest.raises(LoRAAdapterError, match="layer 5, the model has 2"):
        read_adapter(LoRARequest("deep", 1, deep), MODEL, CFG)
    shape = write_adapter(tmp_path / "shape", tensors={
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((4, 32), np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((64, 4), np.float32)})
    with pytest.raises(LoRAAdapterError, match=r"shape \[4, 32\], expected \[4, 64\]"):
        read_adapter(LoRARequest("shape", 1, shape), MODEL, CFG)


def test_lora_request_fields_and_registry_ids(tmp_path):
    with pytest.raises(ValueError, match="lora_int_id must be an integer > 0"):
        LoRARequest("a", 0, "/x")
    with pytest.raises(ValueError, match="lora_path"):
        LoRARequest("a", 1)
    a = LoRARequest("a", 7, write_adapter(tmp_path / "a"), base_model_name="tiny")
    assert (a.name, a.adapter_id, a.path, a.cache_key) == ("a", 7, a.lora_path, "lora:7")
    reg = LoRARegistry(MODEL, CFG)
    assert reg.check(a) is reg.check(a)
    assert reg.check(a).adapter == LoRAAdapter(7, "a", a.lora_path, 2.0) and reg.check(a).adapter.cache_key == "lora:7"
    with pytest.raises(LoRAAdapterError, match="lora_int_id 7 already names adapter 'a'"):
        reg.check(LoRARequest("b", 7, write_adapter(tmp_path / "b")))
    assert reg.remove(7) and not reg.remove(7)


def test_engine_args_lora_limits():
    assert EngineArgs().create_lora_config() is None
    cfg = EngineArgs(enable_lora=True, max_loras=4, max_lora_rank=32).create_lora_config()
    assert cfg == LoRAConfig(max_loras=4, max_lora_rank=32, max_cpu_loras=4)
    with pytest.raises(ValueError, match=r"max_cpu_loras \(2\) must be >= max_loras \(4\)"):
        EngineArgs(enable_lora=True, max_loras=4, max_cpu_loras=2).create_lora_config()
    with pytest.raises(ValueError, match="max_lora_rank must be a positive integer"):
        EngineArgs(enable_lora=True, max_lora_rank=0).create_lora_config()


def test_prefix_hashes_are_keyed_by_adapter():
    tokens = list(range(40))
    a, b = LoRAAdapter(1, "a", "/a", 1.0), LoRAAdapter(2, "b", "/b", 1.0)
    base = hash_prompt_blocks(tokens, 16)
    ha = Request("r1", tokens, SamplingParams(max_tokens=4), 16, lora=a).block_hashes
    assert ha == hash_prompt_blocks(tokens, 16, "lora:1") and len(ha) == 2
    hb = Request("r2", tokens, SamplingParams(max_tokens=4), 16, lora=b).block_hashes
    assert len({ha[0], hb[0], base[0]}) == 3


# -- device slots ------------------------------------------------------------------

A, B, C = (LoRAAdapter(i, n, f"/{n}", 2.0) for i, n in enumerate("abc", start=1))


def test_slots_pin_place_evict_lru_and_retire():
    s = LoRASlots(2)
    s.begin_step()
    assert s.acquire("r1", A) == 0 and s.acquire("r2", B) == 1 and s.acquire("r3", A) == 0
    assert s.take_loads() == {0: A, 1: B} and s.take_loads() == {}
    assert not s.can_acquire("r4", C)  # both slots pinned
    s.release(B)
    assert s.can_acquire("r4", C) and s.acquire("r4", C) == 1 and s.num_evictions == 1
    assert s.take_loads() == {1: C} and [x.lora_name for x in s.resident] == ["a", "c"]
    s.release(A)
    s.release(A)
    s.retire(C.lora_int_id)  # pinned: its slot empties when r4 leaves
    assert s.slot(C) == 1
    s.release(C)
    assert s.free == [1] and C.lora_int_id not in s.slot_of
    s.check_invariants()


def test_slots_drain_for_a_request_that_waited_too_long():
    s = LoRASlots(1)
    s.begin_step()
    s.acquire("a1", A)
    assert not s.can_acquire("c1", C)
    for _ in range(SLOT_WAIT_STEPS - 1):
        s.begin_step()
        assert s.can_acquire("a-new", A) and not s.draining  # joining a pinned slot is allowed for a while
    s.begin_step()
    assert s.draining and not s.can_acquire("a-new", A)
    s.release(A)  # the slot drains; the waiter takes it
    assert s.can_acquire("c1", C) and s.acquire("c1", C) == 0 and not s.draining


# -- the scheduler with slots ---------------------------------------------------------


def lora_sched(slots=2, max_seqs=16, num_blocks=64, budget=64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=256),
                     CacheConfig(block_size=4), num_blocks, LoRAConfig(max_loras=slots, max_cpu_loras=slots))


def lreq(rid, lora, n=8, max_tokens=4):
    return Request(rid, list(range(100, 100 + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=True), 4,
                   lora=lora)


def run_step(s: Scheduler):
    out = s.schedule()
    adapters = {s.requests[x.request_id].lora for x in out.scheduled} - {None}
    assert len(adapters) <= s.loras.num_slots, adapters
    s.update_from_output(out, {x.request_id: [5] for x in out.scheduled if x.sample})
    s.loras.check_invariants()
    return out


def test_a_step_never_uses_more_adapters_than_slots_and_base_requests_pass():
    s = lora_sched(slots=2)
    for i, lora in enumerate([A, B, C, None, C, A]):
        s.add_request(lreq(f"r{i}", lora))
    out = run_step(s)
    assert [x.request_id for x in out.scheduled] == ["r0", "r1", "r3", "r5"]  # C waits; base and A pass
    assert out.lora_loads == {0: A, 1: B}
    assert {n.request_id: n.lora_int_id for n in out.new_requests}["r5"] == A.lora_int_id
    finished = set()
    while s.requests:
        out = run_step(s)
        finished |= set(out.finished_request_ids)
        if {"r2", "r4"} & {x.request_id for x in out.scheduled}:
            assert C in out.lora_loads.values() or s.loras.slot(C) >= 0
    assert s.loras.num_loads == 3 and all(p == 0 for p in s.loras.pins)


def test_preemption_releases_the_slot_and_readmission_takes_it_again():
    s = lora_sched(slots=1, num_blocks=6, budget=64)
    s.add_request(lreq("a", A, n=8, max_tokens=12))
    s.add_request(lreq("b", A, n=8, max_tokens=12))
    for _ in range(12):
        run_step(s)
        if s.num_preemptions:
            break
    assert s.num_preemptions and s.loras.pins[0] == 1  # the victim's pin went with it
    while s.requests:
        run_step(s)
    assert s.loras.pins == [0]


def test_a_stream_of_one_adapter_does_not_starve_another():
    """Slot 0 is never idle while A's requests keep coming; after SLOT_WAIT_STEPS B gets it anyway."""
    s = lora_sched(slots=1, max_seqs=64, num_blocks=400)
    s.add_request(lreq("a0", A, max_tokens=20))
    run_step(s)
    s.add_request(lreq("b0", B, max_tokens=2))
    steps = 0
    while "b0" in s.requests and steps < SLOT_WAIT_STEPS + 60:
        s.add_request(lreq(f"a{steps + 1}", A, max_tokens=20))  # a new A request every step
        run_step(s)
        steps += 1
    assert "b0" not in s.requests, "b0 starved"
    assert SLOT_WAIT_STEPS <= steps < SLOT_WAIT_STEPS + 30


def test_aborting_a_slot_waiter_ends_the_drain():
    s = lora_sched(slots=1)
    s.add_request(lreq("a0", A, max_tokens=200))
    run_step(s)
    s.add_request(lreq("b0", B))
    run_step(s)
    assert "b0" in s.loras.waiters
    s.finish_request("b0", s.requests["b0"].status.FINISHED_ABORTED)
    assert not s.loras.waiters
