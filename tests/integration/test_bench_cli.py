"""`fleetlm bench` smoke runs on CPU with the embedded model: each subcommand runs a
few seconds and writes a valid JSON record (so the GPU suite does not rot in CI).

The engines are built once for the module (one with prefix caching on, one
off) and handed to ``bench.main`` through its ``make_llm`` hook; ``serve``
runs against a minimal OpenAI-style streaming server over ``AsyncEngine``
(aiohttp, in a thread), not the Ray Serve application, which its own tests
cover. Also: the parameter and FLOP arithmetic, exactly, and the
transformers parity helpers of ``benchmarks/hf_baseline.py`` on a tiny
dummy model (the path the GPU parity check takes).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import threading
import uuid
from pathlib import Path

import pytest

from fleetlm.benchmarks import cli as bench
from fleetlm.benchmarks.model_shape import ModelShape, count_params
from fleetlm.benchmarks.offline import prefix_prompts, resolve_prefix_shape
from fleetlm.benchmarks.records import BenchError

MODEL = "smollm2-135m-instruct"
VOCAB = 49152
ENGINE = ["--model", MODEL, "--max-model-len", "256", "--max-num-seqs", "8"]
CEILINGS = ["--matmul-size", "256", "--ceiling-seconds", "0.05"]
RECORD_KEYS = {"benchmark", "card", "num_devices", "torch", "triton", "versions", "commit", "date", "config", "figures"}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def make_llm():
    """Builds each distinct engine once (prefix caching on by default, as in EngineArgs)."""
    from fleetlm import LLM

    cache = {}

    def make(**kw):
        kw.setdefault("enable_prefix_caching", True)
        key = tuple(sorted(kw.items()))
        if key not in cache:
            cache[key] = LLM(**kw)
        return cache[key]

    make.cache = cache
    yield make
    for llm in cache.values():
        llm.engine.shutdown()


def _record(path: Path, name: str) -> dict:
    record = json.loads(path.read_text())
    assert RECORD_KEYS <= set(record)
    assert record["benchmark"] == name
    assert record["card"].startswith("CPU")
    assert record["commit"]
    return record


# --- arithmetic -------------------------------------------------------------------------------


def test_param_count_matches_the_loaders_dummy_shapes():
    from fleetlm.workers.loader.dummy import dummy_tensor_shapes
    from fleetlm.workers.loader.source import _configs_dir, dummy_config_names

    for name in dummy_config_names():
        config = json.loads((_configs_dir() / f"{name}.json").read_text())
        expected = sum(math.prod(shape) for _, shape in dummy_tensor_shapes(config))
        assert count_params(config) == expected, name
    config = json.loads((_configs_dir() / "llama-3.1-8b.json").read_text())
    assert count_params(config) == 8_030_261_248  # 16.06 GB in bf16, the figure


def test_request_flops_by_hand():
    shape = ModelShape(vocab_size=10, hidden_size=4, intermediate_size=8, num_layers=2, num_heads=2,
                             num_kv_heads=1, head_dim=2, tie_word_embeddings=True)
    # per layer: q 4*4 + k,v 2*4*2 + o 4*4 + mlp 3*4*8 = 16 + 16 + 16 + 96
    assert shape.linear_params == 2 * 144
    # prompt 3, 2 generated: positions 0..3 run (4 tokens), causal contexts 1+2+3+4 = 10, 2 logits rows
    attn = 4 * 2 * 2 * 2
    assert shape.request_flops(3, 0, 2) == 2 * 288 * 4 + attn * 10 + 2 * 10 * 4 * 2
    # 2 prefix-cache hits: positions 2..3 run, contexts 3+4
    assert shape.request_flops(3, 2, 2) == 2 * 288 * 2 + attn * 7 + 2 * 10 * 4 * 2
    assert shape.request_flops(3, 0, 0) == 0
    assert shape.kv_bytes_per_token(2) == 2 * 2 * 1 * 2 * 2


def test_prefix_shapes_and_prompts():
    assert resolve_prefix_shape(None, None, 0.9) == (2222, 2000)
    assert resolve_prefix_shape(None, 64, 0.8) == (80, 64)
    assert resolve_prefix_shape(100, None, 0.5) == (100, 50)
    assert resolve_prefix_shape(None, None, 0.0) == (2222, 0)
    with pytest.raises(BenchError):
        resolve_prefix_shape(100, 50, 0.5)
    prefix, prompts = prefix_prompts(3, 20, 8, 1000, seed=0)
    assert len(prefix) == 8 and all(p[:8] == prefix and len(p) == 20 for p in prompts)
    assert len({tuple(p[8:]) for p in prompts}) == 3
    _, unshared = prefix_prompts(3, 20, 0, 1000, seed=0)
    assert all(p[:8] != prefix for p in unshared)  # a different stream from the shared prefix


def test_argument_errors_exit_2_before_loading_a_model(capsys):
    assert bench.main(["prefix", "--shared-fraction", "1.5"]) == 2
    assert bench.main(["throughput", "--engine-arg", "no_such_field=1"]) == 2
    assert bench.main(["throughput", "--num-prompts", "0"]) == 2
    assert bench.main(["serve", "--max-concurrency", "0", "--served-model", "m"]) == 2
    assert "error" in capsys.readouterr().err


# --- subcommands ---------------------------------------------------------------------------------


def test_throughput(make_llm, tmp_path):
    out = tmp_path / "t.json"
    assert bench.main(["throughput", *ENGINE, *CEILINGS, "--num-prompts", "3", "--input-len", "8",
                       "--output-len", "3", "--no-warmup", "--output", str(out)], make_llm=make_llm) == 0
    rec = _record(out, "throughput")
    f = rec["figures"]
    assert f["complete"] and f["num_finished"] == 3
    assert f["output_tokens"] == 9 and f["prompt_tokens"] == 24 and f["num_steps"] == 3
    assert f["requests_per_s"] > 0 and f["output_tokens_per_s"] > 0
    ceilings = rec["config"]["ceilings"]
    assert ceilings["matmul_tflops"] > 0 and ceilings["copy_gbps"] > 0
    # (a 256^3 matmul timed for 50 ms on a shared CPU is no real ceiling: MFU may exceed 1 here)
    assert f["mfu"] == pytest.approx(f["model_tflops_per_s"] / ceilings["matmul_tflops"])
    assert rec["config"]["engine"]["model"] == MODEL


def test_latency(make_llm, tmp_path):
    out = tmp_path / "l.json"
    assert bench.main(["latency", *ENGINE, *CEILINGS, "--batch-size", "2", "--input-len", "8", "--output-len", "4",
                       "--num-iters", "1", "--output", str(out)], make_llm=make_llm) == 0
    rec = _record(out, "latency")
    f = rec["figures"]
    assert f["complete"] and f["num_iters"] == 1
    assert f["num_decode_steps"] == 3  # the prefill step gives the first of 4 tokens
    assert f["warmup_s"] > 0
    assert f["decode_tokens_per_s"] > 0
    assert f["mbu"] == pytest.approx(f["achieved_gbps"] / rec["config"]["ceilings"]["copy_gbps"])
    from fleetlm.workers.loader import resolve_model

    assert f["weight_bytes_per_step"] == 4 * count_params(resolve_model(MODEL).hf_config)  # float32


def test_prefix_on_and_off(make_llm, tmp_path):
    out = tmp_path / "p.json"
    assert bench.main(["prefix", *ENGINE, "--num-prompts", "2", "--prefix-len", "32", "--shared-fraction", "0.8",
                       "--output-len", "1", "--no-warmup", "--repeats", "2", "--output", str(out)],
                      make_llm=make_llm) == 0
    rec = _record(out, "prefix")
    f = rec["figures"]
    assert rec["config"]["input_len"] == 40 and rec["config"]["prefix_len"] == 32
    assert f["on"]["enable_prefix_caching"] and not f["off"]["enable_prefix_caching"]
    assert f["on"]["complete"] and f["off"]["complete"] and f["on"]["num_finished"] == 2
    assert f["on"]["prefix_cache_hit_tokens"] == 2 * 32  # two full blocks of the primed prefix, per prompt
    assert f["off"]["prefix_cache_hit_tokens"] == 0
    assert f["speedup"] > 0
    # two alternating trials per mode; each mode reports its median trial
    assert rec["config"]["repeats"] == 2
    for mode in ("on", "off"):
        assert len(f[mode]["requests_per_s_all"]) == 2
        assert min(f[mode]["requests_per_s_all"]) <= f[mode]["requests_per_s"] <= max(f[mode]["requests_per_s_all"])


# --- serve, against a minimal streaming server --------------------------------------------------


class _Server:
    """POST /v1/completions (stream only, token-id prompts) and GET /v1/models over an AsyncEngine."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        from aiohttp import web

        from fleetlm.engine.async_engine import AsyncEngine

        self.engine = AsyncEngine(self.llm.engine)
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def _models(self, request):
        from aiohttp import web

        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def _completions(self, request):
        from aiohttp import web

        from fleetlm import SamplingParams

        body = await request.json()
        assert body["stream"] and body["model"] == MODEL and body["stream_options"] == {"include_usage": True}
        params = SamplingParams(temperature=body["temperature"], max_tokens=body["max_tokens"],
                                ignore_eos=body["ignore_eos"])
        outputs = self.engine.generate(body["prompt"], params, uuid.uuid4().hex)
        try:  # as the real server: answer only once the engine has taken the request
            first = await outputs.__anext__()
        except ValueError as e:
            return web.json_response({"error": {"message": str(e), "type": "invalid_request_error"}}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        text, n = "", 0

        async def all_outputs():
            yield first
            async for out in outputs:
                yield out

        async for out in all_outputs():
            c = out.outputs[0]
            if len(c.token_ids) > n:
                chunk = {"object": "text_completion", "choices": [
                    {"index": 0, "text": c.text[len(text):], "finish_reason": c.finish_reason}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                text, n = c.text, len(c.token_ids)
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n, "total_tokens": len(body["prompt"]) + n}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def close(self) -> None:
        async def stop():
            await self.runner.cleanup()
            await self.engine.shutdown()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(make_llm):
    s = _Server(make_llm(model=MODEL, max_model_len=256, max_num_seqs=8))
    yield s
    s.close()


def test_serve(server, tmp_path):
    assert bench.main(["serve", "--base-url", server.url, "--num-prompts", "4", "--input-len", "16",
                       "--output-len", "4", "--vocab-size", str(VOCAB), "--max-concurrency", "2",
                       "--duration", "30", "--results-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("serve-c2-*.json")
    rec = _record(path, "serve-c2")
    f = rec["figures"]
    assert rec["config"]["model"] == MODEL  # found through GET /v1/models
    assert f["completed"] == 4 and f["errors"] == 0 and f["complete"]
    assert f["output_tokens"] == 16 and f["usage_missing"] == 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(f[key]) == {"mean", "p50", "p90", "p99"} and f[key]["p50"] > 0
    assert f["ttft_ms"]["p50"] <= f["e2e_ms"]["p50"]


def test_serve_counts_errors(server, tmp_path):
    """Prompt ids outside the vocabulary: the server answers 400; every request is an error, none hangs."""
    out = tmp_path / "s.json"
    assert bench.main(["serve", "--base-url", server.url, "--served-model", MODEL, "--num-prompts", "2",
                       "--input-len", "4", "--output-len", "2", "--vocab-size", str(10 * VOCAB),
                       "--warmup-requests", "0", "--duration", "20", "--request-timeout", "20",
                       "--output", str(out)]) == 0
    f = _record(out, "serve")["figures"]
    assert f["completed"] == 0 and f["errors"] == 2 and f["error_kinds"] == {"http_400": 2} and not f["complete"]


# --- transformers parity helpers (the GPU parity path, on a tiny model) ----------------------------


def _hf_baseline():
    spec = importlib.util.spec_from_file_location("hf_baseline", REPO / "benchmarks" / "hf_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_parity_helpers_on_a_tiny_model():
    from fleetlm import LLM, SamplingParams

    hb = _hf_baseline()
    model = hb.build_hf_model("tiny-llama-8h4kv", device="cpu", dtype=__import__("torch").float32)
    prompts = hb.parity_prompts(model.config.vocab_size, num_prompts=3, seed=0)
    assert [len(p) for p in prompts] == list(hb.PARITY_PROMPT_LENS[:3])
    reference = hb.greedy_reference(model, prompts, max_tokens=4)
    llm = LLM(model="tiny-llama-8h4kv", load_format="dummy", max_model_len=512, max_num_seqs=4)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2))
    llm.engine.shutdown()
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    result = hb.compare_greedy(reference, tokens)
    assert result["prompts_identical"] == 3 and result["tokens_matched"] == 12
    # A forced divergence at step 2, to the reference's second choice, is reported with its margin.
    forced = [list(t) for t in tokens]
    forced[1][2] = reference[1]["top_ids"][2][1]
    result = hb.compare_greedy(reference, forced, [o.outputs[0].logprobs for o in outs])
    entry = result["per_prompt"][1]
    assert entry["diverged_at"] == 2 and entry["matched_tokens"] == 2 and entry["engine_token_ref_rank"] == 1
    logits = reference[1]["top_logits"][2]
    assert entry["ref_margin"] == entry["ref_gap_to_engine_token"] == logits[0] - logits[1]
    assert entry["engine_margin"] == pytest.approx(entry["ref_margin"], abs=1e-4)
    assert result["max_ref_margin_at_divergence"] == entry["ref_margin"]
