"""vLLM-compatible metric names on /metrics (cluster/metric_aliases.py)."""

from prometheus_client.parser import text_string_to_metric_families

from fleetlm.cluster.metric_aliases import VLLM_ALIASES
from fleetlm.cluster.metric_names import EXPORTED_METRIC_NAMES, metric_spec
from fleetlm.cluster.metrics import ServeMetrics, render
from fleetlm.engine.llm_engine import EngineStats


def _samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def _replica(name: str) -> ServeMetrics:
    stats = EngineStats(num_running=3, num_waiting=2, kv_cache_usage=0.25, prefix_cache_queried_tokens=100,
                        prefix_cache_hit_tokens=64, num_preemptions=7)
    m = ServeMetrics("tiny", name, stats_fn=lambda: stats)
    m.request_accepted(12)
    m.first_token(0.3)
    m.tokens_generated(4, 0.02)
    m.request_finished("stop", 1.5)
    m.request_finished("length", 2.0)
    return m


def test_every_alias_names_an_exported_metric_and_a_vllm_name():
    for exported, aliases in VLLM_ALIASES.items():
        assert exported in EXPORTED_METRIC_NAMES, exported
        for a in aliases:
            assert a.startswith("vllm:"), a
            # Same kind of series: counters keep their _total suffix.
            assert a.endswith("_total") == (metric_spec(exported).kind == "counter"), a


def test_aliases_carry_the_same_values_with_vllm_labels():
    samples = _samples(render([_replica("r1").collect(), _replica("r2").collect()]).decode())
    checks = {
        "vllm:num_requests_running": ("fleetlm_num_requests_running", 3.0),
        "vllm:num_requests_waiting": ("fleetlm_num_requests_waiting", 2.0),
        "vllm:kv_cache_usage_perc": ("fleetlm_kv_cache_usage_ratio", 0.25),
        "vllm:gpu_cache_usage_perc": ("fleetlm_kv_cache_usage_ratio", 0.25),
        "vllm:prefix_cache_queries_total": ("fleetlm_prefix_cache_queried_tokens_total", 100.0),
        "vllm:prefix_cache_hits_total": ("fleetlm_prefix_cache_hit_tokens_total", 64.0),
        "vllm:num_preemptions_total": ("fleetlm_num_preemptions_total", 7.0),
        "vllm:prompt_tokens_total": ("fleetlm_prompt_tokens_total", 12.0),
        "vllm:generation_tokens_total": ("fleetlm_generation_tokens_total", 4.0),
        "vllm:time_to_first_token_seconds_count": ("fleetlm_time_to_first_token_seconds_count", 1.0),
        "vllm:time_per_output_token_seconds_count": ("fleetlm_time_per_output_token_seconds_count", 4.0),
        "vllm:inter_token_latency_seconds_count": ("fleetlm_time_per_output_token_seconds_count", 4.0),
        "vllm:e2e_request_latency_seconds_sum": ("fleetlm_e2e_request_latency_seconds_sum", 3.5),
    }
    for alias, (ours, value) in checks.items():
        got = samples[alias]
        assert sorted(s.labels["replica"] for s in got) == ["r1", "r2"], alias
        for s in got:
            assert s.labels["model_name"] == "tiny" and "model" not in s.labels, s
            assert s.value == value, (alias, s)
        assert [s.value for s in samples[ours]] == [s.value for s in got], alias
    success = {(s.labels["replica"], s.labels["finished_reason"]): s.value
               for s in samples["vllm:request_success_total"]}
    assert success == {("r1", "stop"): 1, ("r1", "length"): 1, ("r2", "stop"): 1, ("r2", "length"): 1}
    buckets = [s for s in samples["vllm:time_to_first_token_seconds_bucket"] if s.labels["replica"] == "r1"]
    ours = [s for s in samples["fleetlm_time_to_first_token_seconds_bucket"] if s.labels["replica"] == "r1"]
    assert [(s.labels["le"], s.value) for s in buckets] == [(s.labels["le"], s.value) for s in ours]


def test_ledger_and_error_series_have_no_alias():
    ingress = ServeMetrics("tiny", "ingress")
    ingress.ledger_accepted()
    ingress.request_error("queue_full")
    names = set(_samples(render([ingress.collect()]).decode()))
    assert "fleetlm_requests_accepted_total" in names
    assert not any(n.startswith("vllm:") for n in names), names
