"""Multi-LoRA through `fleetlm serve`, driven by the official `openai` client.

Two replicas of the embedded model with ``--enable-lora --lora-modules``;
adapters made by ``peft``. A request picks an adapter by ``model`` and gets
transformers + PEFT's greedy text; ``/v1/models`` lists adapters with their
base as parent; ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``
act on every replica with vLLM's 400/404 rules; unloading an adapter while a
stream uses it lets the stream finish; per-adapter metrics are exported.
"""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from hf_reference import hf_model_from_source
from lora_adapters import RECIPES, make_peft_model, peft_greedy
from serve_harness import running_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

KEY = "lora-key"
PROMPTS = ["The capital of France is", "Once upon a time,"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def peft_setup(tmp_path_factory, embedded_model):
    from fleetlm.workers.loader import resolve_model

    hf = hf_model_from_source(resolve_model(embedded_model))
    model, paths = make_peft_model(hf, RECIPES[:2], tmp_path_factory.mktemp("adapters"))
    from peft import LoraConfig

    bad = tmp_path_factory.mktemp("bad")
    model.add_adapter("r32", LoraConfig(r=32, lora_alpha=32, target_modules=["q_proj"]))
    model.save_pretrained(str(bad), selected_adapters=["r32"])
    model.delete_adapter("r32")
    return model, paths, str(bad / "r32")


@pytest.fixture(scope="module")
def expected(peft_setup, embedded_model):
    """PEFT's greedy text per (adapter, prompt); None is the base model."""
    from fleetlm.workers.loader import load_tokenizer, resolve_model

    model, _, _ = peft_setup
    tok = load_tokenizer(resolve_model(embedded_model))
    eos = [tok.eos_token_id]
    out = {}
    for name in (None, RECIPES[0].name, RECIPES[1].name):
        tokens = peft_greedy(model, name, [tok.encode(p, add_special_tokens=False) for p in PROMPTS], MAX_TOKENS, eos)
        out.update({(name, p): tok.decode(t) for p, t in zip(PROMPTS, tokens)})
    return out


@pytest.fixture(scope="module")
def server(peft_setup):
    _, paths, _ = peft_setup
    args = (
        "      models:\n"
        "        - model: smollm2-135m-instruct\n"
        "          num_replicas: 2\n"
        "          max_model_len: 512\n"
        "          cpu_kv_cache_bytes: 67108864\n"
    )
    flags = ("--enable-lora", "--max-loras", "2", "--max-lora-rank", "16", "--max-cpu-loras", "4",
             "--lora-modules", f"{RECIPES[0].name}={paths[RECIPES[0].name]}")
    with running_server(args, api_key=KEY, num_cpus=6, extra_flags=flags) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def _complete(client, model, prompt, **kw):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, **kw)
    return r.choices[0].text, r.model


def test_models_lists_the_adapter_under_its_base(client):
    cards = {m.id: m for m in client.models.list().data}
    a = cards[RECIPES[0].name]
    assert a.model_extra["parent"] == "smollm2-135m-instruct" and a.model_extra["root"].endswith(RECIPES[0].name)
    assert "smollm2-135m-instruct" in cards


def test_an_adapter_chosen_by_model_gives_peft_tokens(client, expected):
    for p in PROMPTS:
        text, model = _complete(client, RECIPES[0].name, p)
        assert (text, model) == (expected[RECIPES[0].name, p], RECIPES[0].name)
        assert _complete(client, "smollm2-135m-instruct", p)[0] == expected[None, p]
    assert any(expected[RECIPES[0].name, p] != expected[None, p] for p in PROMPTS)


def test_load_use_and_refuse(client, peft_setup, expected):
    _, paths, bad = peft_setup
    name = RECIPES[1].name
    body = {"lora_name": name, "lora_path": paths[name]}
    r = client.post("/load_lora_adapter", body=body, cast_to=httpx.Response)
    assert r.status_code == 200 and "added successfully" in r.text
    for p in PROMPTS:
        assert _complete(client, name, p)[0] == expected[name, p]
    with pytest.raises(openai.BadRequestError, match="already been loaded"):
        client.post("/load_lora_adapter", body=body, cast_to=httpx.Response)
    with pytest.raises(openai.BadRequestError, match=r"rank 32, above max_lora_rank \(16\)"):
        client.post("/load_lora_adapter", body={"lora_name": "r32", "lora_path": bad}, cast_to=httpx.Response)
    with pytest.raises(openai.BadRequestError, match="no such directory"):
        client.post("/load_lora_adapter", body={"lora_name": "gone", "lora_path": "/nonexistent/adapter"},
                    cast_to=httpx.Response)
    with pytest.raises(openai.NotFoundError, match="cannot be found"):
        client.post("/unload_lora_adapter", body={"lora_name": "never-loaded"}, cast_to=httpx.Response)
    unauth = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        unauth.post("/load_lora_adapter", body=body, cast_to=httpx.Response)
    assert "r32" not in {m.id for m in client.models.list().data}


def test_unloading_lets_a_running_stream_finish(client, peft_setup):
    name = RECIPES[1].name
    stream = client.completions.create(model=name, prompt="Count with me: one, two,", max_tokens=48,
                                       temperature=0, stream=True)
    first = next(iter(stream))  # the request runs
    unloaded = threading.Event()

    def unload():
        client.post("/unload_lora_adapter", body={"lora_name": name}, cast_to=httpx.Response)
        unloaded.set()

    t = threading.Thread(target=unload)
    t.start()
    chunks = [first] + list(stream)
    t.join(60)
    assert unloaded.is_set()
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) >= 40
    with pytest.raises(openai.NotFoundError):
        _complete(client, name, PROMPTS[0])
    assert name not in {m.id for m in client.models.list().data}


def test_metrics_per_adapter(server, client):
    _complete(client, RECIPES[0].name, PROMPTS[0])
    text = httpx.get(server.url + "/metrics", timeout=30).text
    assert f'lora_name="{RECIPES[0].name}"' in text
    for name in ("fleetlm_lora_requests_total", "fleetlm_lora_generation_tokens_total",
                 "fleetlm_lora_resident_adapters", "fleetlm_lora_loads_total"):
        assert name in text, name
