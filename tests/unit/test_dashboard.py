"""/dashboard's pieces without Ray: the numbers (histogram quantiles as Prometheus computes them,
counter totals across replica restarts, the series the page draws), the key check, the files."""

import base64
import hashlib
import math
import re
from pathlib import Path

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from fleetlm.cluster.dashboard import (
    DASHBOARD_ROUTES,
    STATIC_DIR,
    STATIC_FILES,
    DashboardHistory,
    MonotonicTotals,
    authorized,
    histogram_quantile,
)


def test_histogram_quantile_interpolates_like_prometheus():
    # 10 observations <= 0.1, 30 in (0.1, 0.5], 60 in (0.5, 1], none above.
    b = [(0.1, 10), (0.5, 40), (1.0, 100), (math.inf, 100)]
    assert histogram_quantile(0.05, b) == pytest.approx(0.05)       # 5 of 10 in [0, 0.1]
    assert histogram_quantile(0.25, b) == pytest.approx(0.1 + 0.4 * 15 / 30)
    assert histogram_quantile(0.5, b) == pytest.approx(0.5 + 0.5 * 10 / 60)
    assert histogram_quantile(0.99, b) == pytest.approx(0.5 + 0.5 * 59 / 60)
    # A rank in the +Inf bucket answers the largest finite bound; empty: None.
    assert histogram_quantile(0.99, [(1.0, 5), (math.inf, 10)]) == 1.0
    assert histogram_quantile(0.5, [(1.0, 0), (math.inf, 0)]) is None
    assert histogram_quantile(0.5, []) is None


def test_monotonic_totals_survive_a_restarted_series():
    t = MonotonicTotals()
    t.add("m", "r1", 10)
    t.add("m", "r2", 5)
    t.add("m", "r1", 12)   # +2
    t.add("m", "r2", 1)    # r2 restarted: all of its 1 is new
    t.add("m", "r2", 4)    # +3
    assert t.get("m") == 10 + 5 + 2 + 1 + 3
    assert t.get("other") == 0


def _families(running, waiting, kv, tokens, hits, queried, ttft_buckets, replica="r1"):
    fams = []
    for name, v, cls in (("fleetlm_num_requests_running", running, GaugeMetricFamily),
                         ("fleetlm_num_requests_waiting", waiting, GaugeMetricFamily),
                         ("fleetlm_kv_cache_usage_ratio", kv, GaugeMetricFamily),
                         ("fleetlm_generation_tokens_total", tokens, CounterMetricFamily),
                         ("fleetlm_prefix_cache_hit_tokens_total", hits, CounterMetricFamily),
                         ("fleetlm_prefix_cache_queried_tokens_total", queried, CounterMetricFamily)):
        f = cls(name, "h", labels=["model", "replica"])
        f.add_metric(["m", replica], v)
        fams.append(f)
    h = HistogramMetricFamily("fleetlm_time_to_first_token_seconds", "h", labels=["model", "replica"])
    h.add_metric(["m", replica], [(str(le), c) for le, c in ttft_buckets], sum_value=0)
    fams.append(h)
    return fams


def test_history_series_rates_percentiles_and_scaling_events():
    h = DashboardHistory(period_s=5, horizon_s=60, window_s=10)
    deps = {"LLMReplica-m": {"RUNNING": 1}}
    h.record(100.0, _families(1, 0, 0.1, 0, 0, 0, [(0.1, 0), (1.0, 0), ("+Inf", 0)]), deps)
    h.record(105.0, _families(2, 1, 0.3, 50, 10, 40, [(0.1, 2), (1.0, 4), ("+Inf", 4)]),
             {"LLMReplica-m": {"RUNNING": 1, "STARTING": 1}})
    h.record(110.0, _families(2, 0, 0.5, 150, 30, 80, [(0.1, 4), (1.0, 8), ("+Inf", 8)]),
             {"LLMReplica-m": {"RUNNING": 2}})
    s = h.series()
    m = s["models"]["m"]
    assert m["t"] == [100.0, 105.0, 110.0]
    assert m["replicas"] == [1.0, 1.0, 1.0] and m["running"] == [1, 2, 2] and m["waiting"] == [0, 1, 0]
    assert m["kv_usage"] == [0.1, 0.3, 0.5]
    # Over the 10 s window: the first sample has no base; then 50 tokens / 5 s, 150 / 10 s.
    assert m["tokens_per_s"] == [None, 10.0, 15.0]
    assert m["hit_rate"] == [None, 0.25, 30 / 80]
    # TTFT gained over the window: half <= 0.1 s, half in (0.1, 1].
    assert m["ttft_p50"][2] == pytest.approx(0.1)
    assert m["ttft_p99"][2] == pytest.approx(0.1 + 0.9 * (7.92 - 4) / 4)
    assert s["deployments"]["LLMReplica-m"] == {"t": [100.0, 105.0, 110.0], "running": [1, 1, 2],
                                                "wanted": [1, 2, 2]}
    assert [(e["from"], e["to"], e["kind"]) for e in s["events"]] == [(1, 2, "scale up")]


def test_history_keeps_its_horizon_and_counts_a_restarted_replica():
    h = DashboardHistory(period_s=5, horizon_s=20, window_s=5)
    for i in range(10):
        # The replica restarts at i == 6: its counter starts again from 0.
        tokens = 100 * i if i < 6 else 100 * (i - 6)
        h.record(5.0 * i, _families(0, 0, 0, tokens, 0, 0, [(1.0, 0), ("+Inf", 0)]), None)
    m = h.series()["models"]["m"]
    assert len(m["t"]) == 5 and m["t"][0] == 25.0
    # The oldest kept sample has no base; after the restart its counter counts from 0, never negative.
    assert m["tokens_per_s"] == [None, 0.0, 20.0, 20.0, 20.0]


@pytest.mark.parametrize("headers, ok", [
    ({}, False),
    ({"authorization": "Bearer k3y"}, True),
    ({"authorization": "bearer k3y"}, True),
    ({"authorization": "Bearer k3"}, False),
    ({"authorization": "Basic " + base64.b64encode(b"anyone:k3y").decode()}, True),
    ({"authorization": "Basic " + base64.b64encode(b"k3y:").decode()}, False),
    ({"authorization": "Basic " + base64.b64encode(b"anyone:k3y2").decode()}, False),
    ({"authorization": "Basic !!!"}, False),
])
def test_the_api_key_as_bearer_or_basic_password(headers, ok):
    assert authorized(headers, "k3y") is ok
    assert authorized(headers, None) is True


def test_vendored_uplot_is_the_npm_release_unchanged():
    listed = dict(reversed(line.split()) for line in (STATIC_DIR / "VENDORED.md").read_text().splitlines()
                  if re.match(r"^    [0-9a-f]{64}  \S+$", line))
    assert set(listed) == {"uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE"}
    for name, digest in listed.items():
        assert hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest() == digest, name
    assert "MIT License" in (STATIC_DIR / "uPlot.LICENSE").read_text()


def test_page_references_only_served_files():
    html = (STATIC_DIR / "dashboard.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert [r for r in refs if not r.startswith("data:")] == [f"dashboard/static/{n}" for n in (
        "uPlot.min.css", "dashboard.css", "uPlot.iife.min.js", "dashboard.js")]
    assert set(STATIC_FILES) == {Path(r).name for r in refs if r.startswith("dashboard/static/")}
    assert set(DASHBOARD_ROUTES) == {"/dashboard", "/dashboard/data"} | {f"/dashboard/static/{n}" for n in STATIC_FILES}
    # No build step and nothing from elsewhere: no module imports, no external URLs.
    js = (STATIC_DIR / "dashboard.js").read_text()
    assert "import " not in js and "http" not in js and "http" not in html
