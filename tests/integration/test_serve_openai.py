"""`fleetlm serve` as the README runs it, driven by the official `openai` client.

One server for the whole module (started once: Ray plus the embedded model
take tens of seconds on a CPU); the last test SIGTERMs it and checks the
drain. The server runs with a dedicated RAY_TMPDIR and a marker in its
environment, so the test can tell its Ray processes from any other's.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_harness import free_port, marked_pids

from fleetlm.cluster.metric_names import EXPORTED_METRICS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MODEL = "smollm2-135m-instruct"
# The README's command; `python -m` where the console script is not on PATH.
FLEETLM = ["fleetlm"] if shutil.which("fleetlm") else [sys.executable, "-m", "fleetlm.cluster.cli"]
STARTUP_TIMEOUT_S = 420
DRAIN_TIMEOUT_S = 60
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name three colors of the rainbow."},
]


# --- a `fleetlm serve` subprocess ----------------------------------------------------

class ServeProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.tmp = tempfile.mkdtemp(prefix="flm-", dir="/tmp")  # short: Ray's unix sockets live here
        self.marker = f"FLEETLM_TEST_SESSION={uuid.uuid4().hex}"
        self.log_path = os.path.join(self.tmp, "serve.log")
        full_env = {**os.environ, "RAY_TMPDIR": self.tmp, "RAY_USAGE_STATS_ENABLED": "0",
                    "FLEETLM_TEST_SESSION": self.marker.split("=", 1)[1], **(env or {})}
        full_env.pop("RAY_ADDRESS", None)
        self.log = open(self.log_path, "wb")
        # Its own process group, as under systemd, Docker or a shell job: the last
        # test stops it with a signal to the whole group.
        self.proc = subprocess.Popen(
            [*FLEETLM, "serve", "--port", str(self.port), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)

    def log_tail(self, n: int = 4000) -> str:
        with open(self.log_path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"fleetlm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail(f"fleetlm serve not healthy after {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DRAIN_TIMEOUT_S + 40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in marked_pids(self.marker):  # safety net: only processes this server started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


@pytest.fixture(scope="module")
def server():
    srv = ServeProcess("--drain-timeout", str(DRAIN_TIMEOUT_S))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(server):
    """Greedy LLM.chat output and the tokenizer, computed in-process while the server starts."""
    from fleetlm import LLM, SamplingParams

    llm = LLM(model=MODEL, cpu_kv_cache_bytes=64 << 20)
    out = llm.chat(MESSAGES, SamplingParams(temperature=0.0, max_tokens=24))[0]
    ref = {"chat_text": out.outputs[0].text, "chat_prompt_tokens": len(out.prompt_token_ids),
           "tokenizer": llm.get_tokenizer()}
    del llm
    return ref


@pytest.fixture(scope="module")
def base(server, reference):
    # `reference` first: the in-process model loads while the server starts.
    server.wait_ready()
    return server.base


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def _metrics(base: str) -> dict[str, float]:
    """Sample name (with labels other than model/replica) -> value, summed over replicas."""
    text = httpx.get(base + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            extra = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("model", "replica", "le"))
            if "le" in s.labels:
                continue
            key = f"{s.name}{{{extra}}}" if extra else s.name
            out[key] = out.get(key, 0.0) + s.value
    return out


# --- tests -----------------------------------------------------------------------------

def test_models_and_health(base, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = httpx.get(base + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_chat_greedy_equals_llm_chat_and_usage(client, reference):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=24)
    assert r.choices[0].message.content == reference["chat_text"]
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == reference["chat_prompt_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # Streaming gives the same text, and the usage chunk at the end.
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference["chat_text"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_completion_usage_matches_tokenizer(client, reference):
    prompt = "The quick brown fox jumps over the lazy dog. Once upon a time"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                  logprobs=2, extra_body={"ignore_eos": True})
    n_prompt = len(reference["tokenizer"].encode(prompt, add_special_tokens=False))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 8, n_prompt + 8)
    c = r.choices[0]
    assert c.finish_reason == "length"
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert all(x <= 0 for x in lp.token_logprobs)
    assert "".join(lp.tokens) == c.text
    # Token-id prompts, several prompts, echo.
    ids = reference["tokenizer"].encode(prompt, add_special_tokens=False)
    r2 = client.completions.create(model=MODEL, prompt=[ids, ids[:5]], max_tokens=4, temperature=0)
    assert [ch.index for ch in r2.choices] == [0, 1]
    assert r2.choices[0].text == c.text[:len(r2.choices[0].text)]
    assert r2.usage.prompt_tokens == len(ids) + 5
    r3 = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True)
    assert r3.choices[0].text.startswith(prompt)


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
               for t in content)
    # Greedy: the chosen token is the most likely one.
    assert all(t.token == t.top_logprobs[0].token for t in content)


def test_n2_and_seed_reproducible(client):
    kw = dict(model=MODEL, prompt="Write a word:", max_tokens=12, temperature=1.0, n=2, seed=1234,
              extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text  # the two samples differ (seed + index)
    assert a.usage.completion_tokens == 24
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, n=2, seed=7)
    assert sorted(c.index for c in chat.choices) == [0, 1]
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, n=2, seed=7)
    assert [c.message.content for c in chat.choices] == [c.message.content for c in again.choices]


def test_stop(client, reference):
    full = reference["chat_text"]
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=24, stop=[stop])
    c = r.choices[0]
    assert c.finish_reason == "stop"
    assert c.message.content == full[:full.index(stop)]


def test_cached_tokens_on_repeated_long_prompt(client):
    prompt = " ".join(f"item{i}" for i in range(120)) + "\nSummarize:"
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > 100
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.usage.prompt_tokens_details.cached_tokens <= second.usage.prompt_tokens


def _idle_kv(base: str, timeout: float = 60) -> float:
    """KV usage once nothing runs or waits (prefix-cached blocks may remain, unreferenced)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = _metrics(base)
        if m["fleetlm_num_requests_running"] == 0 and m["fleetlm_num_requests_waiting"] == 0:
            return m["fleetlm_kv_cache_usage_ratio"]
        time.sleep(0.1)
    pytest.fail("the server never went idle")


def _wait_idle(base: str, idle_kv: float, within: float) -> dict[str, float]:
    deadline = time.monotonic() + within
    while True:
        m = _metrics(base)
        if m["fleetlm_num_requests_running"] == 0 and m["fleetlm_kv_cache_usage_ratio"] == idle_kv:
            return m
        if time.monotonic() > deadline:
            pytest.fail(f"not idle {within} s after the last client left: "
                        f"running={m['fleetlm_num_requests_running']} kv={m['fleetlm_kv_cache_usage_ratio']} "
                        f"(idle kv {idle_kv})")
        time.sleep(0.1)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_within_one_second(base, stream):
    idle_kv = _idle_kv(base)
    body = {"model": MODEL, "prompt": "Count to one thousand:", "max_tokens": 2000, "stream": stream,
            "ignore_eos": True}
    with httpx.Client(timeout=httpx.Timeout(60, read=2.0)) as http:
        if stream:
            with http.stream("POST", base + "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                for _ in range(6):
                    next(lines)
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post(base + "/v1/completions", json=body)
    assert _metrics(base)["fleetlm_requests_accepted_total"] > 0
    _wait_idle(base, idle_kv, 1.0)


def test_concurrent_streams_then_cut_streams(base):
    async def one(ac: openai.AsyncOpenAI, i: int, cut_after: int | None, seen: dict) -> tuple[str, bool]:
        stream = await ac.completions.create(model=MODEL, prompt=f"Story number {i}:", max_tokens=16,
                                             stream=True, extra_body={"ignore_eos": True})
        text, n = "", 0
        async for chunk in stream:
            n += 1
            if chunk.choices:
                text += chunk.choices[0].text
            if cut_after is not None and n >= cut_after:
                await stream.close()
                seen["last_cut"] = time.monotonic()
                return text, False
        return text, True

    async def scrape_while(tasks, seen):
        while not all(t.done() for t in tasks):
            m = await asyncio.to_thread(_metrics, base)
            seen["max_running"] = max(seen.get("max_running", 0), m["fleetlm_num_requests_running"])
            seen["max_kv"] = max(seen.get("max_kv", 0), m["fleetlm_kv_cache_usage_ratio"])
            await asyncio.sleep(0.05)

    async def go(cut: set[int], seen: dict):
        async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120) as ac:
            tasks = [asyncio.ensure_future(one(ac, i, 3 if i in cut else None, seen)) for i in range(32)]
            await scrape_while(tasks, seen)
            return await asyncio.gather(*tasks)

    idle_kv = _idle_kv(base)
    seen: dict = {}
    results = asyncio.run(go(set(), seen))
    assert all(done and text for text, done in results)  # every stream reached [DONE]
    assert seen["max_running"] > 0 and seen["max_kv"] > 0
    _wait_idle(base, idle_kv, 2.0)

    cut = set(range(0, 32, 3))  # 11 of 32 (~30%) cut mid-way
    results = asyncio.run(go(cut, {}))
    assert [done for _, done in results] == [i not in cut for i in range(32)]
    _wait_idle(base, idle_kv, 2.0)


# Counters of events this traffic never causes: exported (present), their wiring
# from the engine's stats checked in tests/unit/test_metric_aliases.py.
# Exported but not caused by this app's traffic: no preemption, and it does not speculate.
NOT_CAUSED_HERE = {"fleetlm_num_preemptions_total", "fleetlm_spec_decode_verifies_total",
                   "fleetlm_spec_decode_proposed_tokens_total", "fleetlm_spec_decode_accepted_tokens_total",
                   "fleetlm_spec_decode_emitted_tokens_total"}


def test_metrics_every_exported_metric_nonzero_after_traffic(base):
    m = _metrics(base)
    for spec in EXPORTED_METRICS:
        if spec.name.startswith("fleetlm_lora_"):
            continue  # this app serves no adapter (test_lora_serve.py checks these after adapter traffic)
        if spec.kind == "histogram":
            assert m.get(spec.name + "_count", 0) > 0, spec.name
        elif spec.name in NOT_CAUSED_HERE:
            assert spec.name in m, spec.name
        elif spec.kind == "counter":
            values = [v for k, v in m.items() if k == spec.name or k.startswith(spec.name + "{")]
            assert values and sum(values) > 0, spec.name
        else:
            # Gauges: present (the non-zero values were seen during traffic, in the test above).
            assert spec.name in m or any(k.startswith(spec.name + "{") for k in m), spec.name
    assert m["fleetlm_request_success_total{finish_reason=length}"] > 0
    assert m["fleetlm_request_errors_total{reason=abort}"] > 0
    assert m["fleetlm_prefix_cache_hit_tokens_total"] > 0


def _listening(pids: list[int]) -> list[tuple[str, str, int]]:
    import psutil

    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            found += [(proc.name(), c.laddr.ip, c.laddr.port) for c in proc.net_connections("inet")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    return found


def test_only_loopback_ports_and_the_http_port_where_asked(server, base):
    """A single-machine server's Ray processes (GCS, raylet, agents, workers) listen on
    loopback only; the HTTP port listens on the host asked for (127.0.0.1 here)."""
    import ipaddress

    sockets = _listening(marked_pids(server.marker))
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # Ray's own servers were seen
    assert ("127.0.0.1", server.port) in {(ip, port) for _, ip, port in sockets}
    exposed = []
    for name, ip, port in sockets:
        addr = ipaddress.ip_address(ip)
        mapped = getattr(addr, "ipv4_mapped", None)
        if not (addr.is_loopback or (mapped is not None and mapped.is_loopback)):
            exposed.append((name, ip, port))
    assert exposed == [], f"listening beyond loopback: {exposed}"


def test_process_group_sigterm_drains_inflight_streams_and_leaves_no_ray_process(server, base):
    async def one(ac, i):
        events = []
        try:
            stream = await ac.completions.create(model=MODEL, prompt=f"Tale {i}:", max_tokens=48, stream=True,
                                                 extra_body={"ignore_eos": True})
            async for chunk in stream:
                events.append(chunk)
        except openai.APIError as e:  # a clean error event or status
            return "error", str(e)
        return "done", len(events)

    async def go():
        async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120) as ac:
            tasks = [asyncio.ensure_future(one(ac, i)) for i in range(8)]
            deadline = time.monotonic() + 60
            while (await asyncio.to_thread(_metrics, base))["fleetlm_num_requests_running"] < 8:
                assert time.monotonic() < deadline, "the 8 streams never ran together"
                await asyncio.sleep(0.05)
            t0 = time.monotonic()
            # What systemd (KillMode=control-group aside), supervisord's stopasgroup and a
            # shell send: SIGTERM to every process of the command's process group.
            os.killpg(server.proc.pid, signal.SIGTERM)
            # Draining: the health check fails (load balancers stop sending) and new requests get 503.
            while (await asyncio.to_thread(httpx.get, base + "/health", timeout=10)).status_code != 503:
                assert time.monotonic() - t0 < 10, "the server did not start draining"
                await asyncio.sleep(0.05)
            r = await asyncio.to_thread(httpx.post, base + "/v1/completions", json={"prompt": "x"}, timeout=10)
            assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
            return await asyncio.gather(*tasks), t0

    results, t0 = asyncio.run(go())
    assert all(kind in ("done", "error") for kind, _ in results), results
    assert sum(kind == "done" for kind, _ in results) == 8, results  # 48 tokens fit well within the drain
    rc = server.proc.wait(DRAIN_TIMEOUT_S + 30)
    assert rc == 0, server.log_tail()
    assert time.monotonic() - t0 < DRAIN_TIMEOUT_S + 30
    deadline = time.monotonic() + 10
    while marked_pids(server.marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = marked_pids(server.marker)
    ps = subprocess.run(["ps", "-o", "pid,args", "-p", ",".join(map(str, left))], capture_output=True,
                        text=True).stdout if left else ""
    assert not left, f"Ray processes left behind:\n{ps}"
    # raylet and gcs_server name their session dir (under our RAY_TMPDIR) on the command line.
    args = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    assert not [a for a in args if server.tmp in a]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
