"""What an operator watches, against one real ``fleetlm serve`` (the embedded model) shared by
this module's tests:

- a real Prometheus (Debian's package) scrapes it with configs/prometheus/prometheus.yml
  (FleetLM's /metrics and Ray's metrics agent, found the way Ray's service discovery file
  lists it) and loads configs/prometheus/alerts.yml; after traffic every Grafana panel query
  and every alert expression is evaluated through Prometheus's HTTP API and must return
  plausible series; the vLLM-compatible names answer vLLM-style queries;
- ``/dashboard`` in headless Chromium (Debian's package, driven by Playwright): the API key
  applies, the page loads without a console error and its charts show the traffic.
"""

from __future__ import annotations

import concurrent.futures
import math
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from ops_tools import (
    alert_rules,
    grafana_queries,
    prometheus_config,
    running_prometheus,
    with_bool_comparisons,
)
from serve_harness import MODEL, running_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

API_KEY = "ops-test-key"
APP_ARGS = (
    "      api_key: " + API_KEY + "\n"
    "      models:\n"
    f"        - model: {MODEL}\n"
    "          max_model_len: 2048\n"
    # Autoscaled (so Ray exports its autoscaling series), pinned at one replica.
    "          autoscaling: {min_replicas: 1, max_replicas: 1}\n"
)
SYSTEM = ("You are the support assistant of a bicycle shop. Answer briefly and politely. "
          "Opening hours are nine to six on weekdays and ten to four on Saturdays. "
          "Repairs take two days; rentals need an ID. ") * 3
QUESTIONS = ["Are you open on Sunday?", "How long does a repair take?", "Can I rent a bike?",
             "Do you sell helmets?", "Where are you?", "Can I pay by card?", "Do you fix e-bikes?",
             "Is there parking?"]


def _ray_metrics_port(tmp: str) -> int:
    """The metrics agent's export port, from the Ray session dir (the port Ray's own service
    discovery file lists; `fleetlm serve` starts Ray without the dashboard that writes that file)."""
    files = list(Path(tmp).glob("ray/session_latest/metrics_export_port_*"))
    assert len(files) == 1, files
    return int(files[0].read_text().strip())


def _traffic(url: str, rounds: int = 2) -> dict[str, int]:
    """Chat requests sharing a system prompt (prefix-cache hits), half streamed, 4 at a time;
    and two client mistakes (an error series)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def one(i: int) -> int:
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        if i % 2:
            n = 0
            for chunk in client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, stream=True,
                                                        temperature=0):
                n += sum(1 for c in chunk.choices if c.delta.content)
            return n
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
        return r.usage.completion_tokens

    def mistake() -> None:
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="hi", max_tokens=10**7)

    mistake()  # before and after: the error counter's series exists before it increases (a rate)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        tokens = list(pool.map(one, range(rounds * len(QUESTIONS))))
    assert all(t > 0 for t in tokens), tokens
    mistake()
    return {"requests": len(tokens), "tokens": sum(tokens)}


@pytest.fixture(scope="module")
def server():
    t0 = time.monotonic()
    with running_server(APP_ARGS, api_key=API_KEY,
                        extra_env={"RAY_metrics_report_interval_ms": "2000"}) as s:
        print(f"\n[observability] fleetlm serve up in {time.monotonic() - t0:.0f} s")
        yield s


@pytest.fixture(scope="module")
def traffic(server, prometheus):
    # After Prometheus's first scrape, so its rates see the counters move.
    prometheus.wait_for('up{job="fleetlm"} == 1', 60)
    t0 = time.monotonic()
    done = _traffic(server.url)
    print(f"[observability] traffic: {done} in {time.monotonic() - t0:.1f} s")
    return done


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prometheus")
    ray_target = f"127.0.0.1:{_ray_metrics_port(server.tmp)}"
    cfg = prometheus_config(server.url.removeprefix("http://"), [ray_target], tmp)
    with running_prometheus(cfg, tmp) as prom:
        yield prom


def _values(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result]


def _plausible(title: str, legend: str, values: list[float]) -> None:
    """What each panel of the Grafana dashboard may show after the traffic."""
    finite = [v for v in values if math.isfinite(v)]
    assert finite, (title, legend, values)
    latency_bounds = {"Time to first token": 120.0, "Time per output token": 10.0, "End-to-end": 300.0}
    hi = next((b for prefix, b in latency_bounds.items() if title.startswith(prefix)), None)
    if hi is not None:
        assert all(0 < v < hi for v in finite), (title, legend, values)
    elif title == "KV cache usage":
        assert all(0 <= v <= 1 for v in finite), values
    elif title == "Prefix cache hit rate":
        assert all(0 < v <= 1 for v in finite), values  # the shared system prompt hits
    elif title == "Replicas per model":
        assert values and all(v == 1.0 for v in values), (legend, values)  # the model's and the ingress
    elif title == "Scaling decisions" and "changes" not in legend:
        assert 1.0 in values and all(v in (0.0, 1.0) for v in values), (legend, values)
    elif title in ("Tokens per second", "Requests per second", "Successful requests by finish reason",
                   "Errors per second"):
        assert all(v >= 0 for v in finite) and max(finite) > 0, (title, legend, values)
    else:
        assert all(v >= 0 for v in finite), (title, legend, values)


NOT_USED_HERE = {"Requests and tokens per adapter", "Speculative decoding: acceptance rate",
                 "Speculative decoding: mean accepted length"}


def test_prometheus_scrapes_fleetlm_and_ray_and_every_query_answers(server, traffic, prometheus):
    t0 = time.monotonic()
    # Both jobs scraped: FleetLM's /metrics through the Serve proxy, Ray's metrics agent.
    prometheus.wait_for('fleetlm_generation_tokens_total > 0', 60)
    prometheus.wait_for(f'last_over_time(ray_serve_deployment_replica_healthy{{deployment="LLMReplica-{MODEL}"}}[2m])', 90)
    prometheus.wait_for('ray_serve_autoscaling_desired_replicas{application="fleetlm"}', 90)
    targets = prometheus.get("/api/v1/targets")["activeTargets"]
    assert sorted(t["labels"]["job"] for t in targets) == ["fleetlm", "ray"], targets
    assert all(t["health"] == "up" for t in targets), targets

    # Every Grafana panel query: a non-empty, plausible answer; the panels of features this app
    # does not use (no adapter requests, no speculation) answer without error, empty or 0/0.
    for title, legend, expr in grafana_queries():
        result = prometheus.query(expr)
        if title in NOT_USED_HERE:
            assert all(v >= 0 for v in _values(result) if math.isfinite(v)), (title, legend, result)
            continue
        assert result, f"{title} / {legend}: empty\n{expr}"
        _plausible(title, legend, _values(result))

    # The counters agree with the traffic the test sent.
    gen = sum(_values(prometheus.query("sum(fleetlm_generation_tokens_total)")))
    assert gen >= traffic["tokens"], (gen, traffic)
    ok = sum(_values(prometheus.query('sum(fleetlm_requests_finished_total{reason=~"stop|length"})')))
    assert ok == traffic["requests"], ok
    errors = prometheus.query('fleetlm_request_errors_total{reason="invalid_request_error"}')
    assert [r["metric"]["model"] for r in errors] == [MODEL], errors

    # The alert rules are loaded and evaluate without error; each expression answers (as 0/1 per
    # series with its comparisons made `bool`), and none holds for this healthy server.
    deadline = time.monotonic() + 30
    while True:
        groups = prometheus.get("/api/v1/rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "").startswith("2") and r["health"] != "unknown" for r in rules):
            break
        assert time.monotonic() < deadline, rules
        time.sleep(1)
    assert sorted(r["name"] for r in rules) == sorted(a["alert"] for a in alert_rules())
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    # (Latency and throughput ones may hold on a loaded 2-core machine; these may not.)
    healthy = {"FleetLMNoHealthyReplica", "FleetLMReplicasBelowTarget", "FleetLMHighErrorRate",
               "FleetLMHighRateLimited", "FleetLMKVCacheNearlyFull", "FleetLMPreemptions"}
    for rule in alert_rules():
        result = prometheus.query(with_bool_comparisons(rule["expr"]))
        assert result, f"{rule['alert']}: no series\n{rule['expr']}"
        for r in result:
            assert r["metric"].get("model") == MODEL, (rule["alert"], r)  # the summary names it
            assert float(r["value"][1]) in ((0.0,) if rule["alert"] in healthy else (0.0, 1.0)), (rule["alert"], r)
    firing = [a for a in prometheus.get("/api/v1/alerts")["alerts"] if a["state"] == "firing"]
    assert firing == [], firing

    # vLLM-compatible names answer the queries written for vLLM (llm-d's, vLLM's dashboards).
    vllm_queries = {
        'sum by (model_name) (vllm:num_requests_waiting)': lambda v: v >= 0,
        'sum by (model_name) (vllm:num_requests_running)': lambda v: v >= 0,
        'max by (model_name) (vllm:kv_cache_usage_perc)': lambda v: 0 <= v <= 1,
        'max by (model_name) (vllm:gpu_cache_usage_perc)': lambda v: 0 <= v <= 1,
        'histogram_quantile(0.99, sum by (le, model_name) (rate(vllm:time_to_first_token_seconds_bucket[5m])))':
            lambda v: 0 < v < 120,
        'histogram_quantile(0.5, sum by (le, model_name) (rate(vllm:inter_token_latency_seconds_bucket[5m])))':
            lambda v: 0 < v < 10,
        'sum by (model_name) (rate(vllm:generation_tokens_total[5m]))': lambda v: v > 0,
        'sum by (model_name) (vllm:prefix_cache_hits_total) / sum by (model_name) (vllm:prefix_cache_queries_total)':
            lambda v: 0 < v <= 1,
        'sum by (model_name, finished_reason) (vllm:request_success_total)': lambda v: v > 0,
        'sum by (model_name) (vllm:num_preemptions_total)': lambda v: v == 0,
    }
    for expr, ok in vllm_queries.items():
        result = prometheus.query(expr)
        assert result and all(r["metric"]["model_name"] == MODEL and ok(float(r["value"][1])) for r in result), \
            (expr, result)
    same = prometheus.query("sum(vllm:generation_tokens_total) - sum(fleetlm_generation_tokens_total)")
    assert _values(same) == [0.0]
    print(f"[observability] {len(grafana_queries())} panel queries, {len(alert_rules())} alert expressions, "
          f"{len(vllm_queries)} vLLM queries checked in {time.monotonic() - t0:.1f} s")


# --- /dashboard -------------------------------------------------------------------------------


def test_dashboard_needs_the_api_key(server):
    for path in ("/dashboard", "/dashboard/data", "/dashboard/static/uPlot.iife.min.js"):
        r = httpx.get(server.url + path, timeout=30)
        assert r.status_code == 401, (path, r.status_code)
        assert r.headers["www-authenticate"].startswith('Basic realm="FleetLM dashboard"'), r.headers
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + path, auth=("admin", "wrong"), timeout=30).status_code == 401
        assert httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
        assert httpx.get(server.url + path, auth=("admin", API_KEY), timeout=30).status_code == 200, path
        assert httpx.get(server.url + path, headers={"Authorization": f"Bearer {API_KEY}"},
                         timeout=30).status_code == 200, path
    r = httpx.get(server.url + "/dashboard/static/dashboard.py", auth=("a", API_KEY), timeout=30)
    assert r.status_code == 404, r.status_code


def test_dashboard_in_headless_chromium(server, traffic, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = "/usr/bin/chromium"
    assert Path(chromium).exists(), "install Debian's chromium package (.ci/run does)"
    t0 = time.monotonic()
    console_errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            ctx = browser.new_context(http_credentials={"username": "operator", "password": API_KEY},
                                      viewport={"width": 1400, "height": 900})
            page = ctx.new_page()
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: console_errors.append(f"page error: {e}"))
            resp = page.goto(server.url + "/dashboard", wait_until="load", timeout=60_000)
            assert resp is not None and resp.status == 200
            # More traffic while the page watches, then its charts must show it.
            _traffic(server.url, rounds=1)
            slug = re.sub(r"[^A-Za-z0-9_-]", "_", MODEL)
            for chart in ("replicas", "queue", "kv", "ttft", "tpot", "tokens", "hits"):
                page.wait_for_function(
                    f"() => {{ const e = document.getElementById('model-{slug}-{chart}');"
                    f" return e && e.classList.contains('has-data') && e.querySelector('canvas'); }}",
                    timeout=60_000)
            page.wait_for_function("() => document.querySelector('#scaling .chart.has-data')", timeout=60_000)
            assert page.inner_text("#status") == "live"
            points = page.eval_on_selector(f"#model-{slug}-tokens", "e => Number(e.dataset.points)")
            assert points > 0
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 20_000
        finally:
            browser.close()
    assert console_errors == [], console_errors
    print(f"[observability] dashboard checked in {time.monotonic() - t0:.1f} s; screenshot {shot}")
