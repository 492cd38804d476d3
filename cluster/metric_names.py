"""Every Prometheus metric FleetLM exports: name, type, help, labels, buckets.

One list, read by three parties: the serving code builds its
`prometheus_client` collectors from it, the Grafana dashboard queries these
names, and tests/unit/test_configs.py checks that the dashboard asks for
nothing that is not exported. Renaming a metric here without updating
configs/grafana/ fails that test.

Counter names carry their `_total` suffix as exposed on /metrics
(`prometheus_client.Counter` accepts the suffixed name and exposes it
unchanged). Histograms are exposed as `<name>_bucket`, `_sum` and `_count`.
Every series has the labels `model` (served name) and `replica` (Ray Serve
replica id), first and in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

BASE_LABELS = ("model", "replica")
KINDS = ("counter", "gauge", "histogram")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Time to first token spans a cached-prefix hit on a GPU (ms) to a long
# prefill queued behind others on a CPU (tens of seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# Time per output token: ~5 ms decode steps on an H100 up to seconds per
# token for a small model on a busy CPU.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03,
                0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
               30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric, enough to build its prometheus_client collector."""

    name: str
    kind: str                                 # "counter" | "gauge" | "histogram"
    help: str
    labels: tuple[str, ...] = BASE_LABELS
    buckets: tuple[float, ...] | None = None  # histograms only

    def __post_init__(self) -> None:
        if not self.name.startswith("fleetlm_"):
            raise ValueError(f"{self.name}: FleetLM metric names start with fleetlm_")
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.labels[:2] != BASE_LABELS:
            raise ValueError(f"{self.name}: labels must start with {BASE_LABELS}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"{self.name}: duplicate labels {self.labels}")
        if (self.kind == "counter") != self.name.endswith("_total"):
            raise ValueError(f"{self.name}: counters, and only counters, end with _total")
        if self.kind == "histogram":
            b = self.buckets
            if not b or any(x >= y for x, y in zip(b, b[1:])):
                raise ValueError(f"{self.name}: histogram buckets must be strictly increasing")
            if self.name.endswith(HISTOGRAM_SUFFIXES):
                raise ValueError(f"{self.name}: a histogram's base name has no exposition suffix")
        elif self.buckets is not None:
            raise ValueError(f"{self.name}: only histograms have buckets")


EXPORTED_METRICS: tuple[MetricSpec, ...] = (
    # Latency, observed once per request (TPOT once per output token after the first).
    MetricSpec("fleetlm_time_to_first_token_seconds", "histogram",
               "Seconds from request arrival to its first output token.",
               buckets=TTFT_BUCKETS),
    MetricSpec("fleetlm_time_per_output_token_seconds", "histogram",
               "Seconds between consecutive output tokens of a request.",
               buckets=TPOT_BUCKETS),
    MetricSpec("fleetlm_e2e_request_latency_seconds", "histogram",
               "Seconds from request arrival to its last output token.",
               buckets=E2E_BUCKETS),
    # Engine state, sampled each step.
    MetricSpec("fleetlm_num_requests_running", "gauge",
               "Requests in the running batch of the replica's engine."),
    MetricSpec("fleetlm_num_requests_waiting", "gauge",
               "Requests queued in the replica's engine, not yet scheduled."),
    MetricSpec("fleetlm_kv_cache_usage_ratio", "gauge",
               "Fraction of KV-cache blocks in use (0..1)."),
    # Token and request counters.
    MetricSpec("fleetlm_prompt_tokens_total", "counter",
               "Prompt tokens of admitted requests."),
    MetricSpec("fleetlm_generation_tokens_total", "counter",
               "Output tokens generated."),
    MetricSpec("fleetlm_prefix_cache_queried_tokens_total", "counter",
               "Prompt tokens looked up in the prefix cache."),
    MetricSpec("fleetlm_prefix_cache_hit_tokens_total", "counter",
               "Prompt tokens found in the prefix cache (KV reused, not recomputed)."),
    MetricSpec("fleetlm_num_preemptions_total", "counter",
               "Running requests preempted (KV blocks freed, recomputed later) by the engine."),
    # The ledger, counted by the ingress: every accepted request (valid and
    # admitted) ends exactly once, so once idle accepted == sum(finished).
    MetricSpec("fleetlm_requests_accepted_total", "counter",
               "HTTP requests the ingress accepted (valid and admitted)."),
    MetricSpec("fleetlm_requests_finished_total", "counter",
               "Accepted HTTP requests that ended, by reason: stop or length (complete), "
               "abort (the client left) or the error code (unavailable, internal, ...).",
               labels=BASE_LABELS + ("reason",)),
    MetricSpec("fleetlm_request_success_total", "counter",
               "Requests that finished normally, by finish_reason (stop, length).",
               labels=BASE_LABELS + ("finish_reason",)),
    MetricSpec("fleetlm_request_errors_total", "counter",
               "Requests that failed, by reason (abort, error, timeout, ...).",
               labels=BASE_LABELS + ("reason",)),
    # Multi-LoRA: per adapter (lora_name), and the replica's device slots.
    MetricSpec("fleetlm_lora_requests_total", "counter",
               "Requests that finished on the replica with a LoRA adapter, by adapter.",
               labels=BASE_LABELS + ("lora_name",)),
    MetricSpec("fleetlm_lora_prompt_tokens_total", "counter",
               "Prompt tokens of finished requests with a LoRA adapter, by adapter.",
               labels=BASE_LABELS + ("lora_name",)),
    MetricSpec("fleetlm_lora_generation_tokens_total", "counter",
               "Output tokens of finished requests with a LoRA adapter, by adapter.",
               labels=BASE_LABELS + ("lora_name",)),
    MetricSpec("fleetlm_lora_resident_adapters", "gauge",
               "LoRA adapters in the replica's device slots now."),
    MetricSpec("fleetlm_lora_loads_total", "counter",
               "LoRA adapters loaded into a device slot (a first use or a swap)."),
    MetricSpec("fleetlm_lora_evictions_total", "counter",
               "LoRA adapters evicted from a device slot to make room for another."),
    # Cold start, set once when a replica is ready.
    MetricSpec("fleetlm_startup_seconds", "gauge",
               "Seconds of each start-up phase of the replica: process (Ray actor start and imports), "
               "the engine's (tokenizer, workers, load_weights, kv_cache, cuda_graphs, warmup) and "
               "replica (its whole construction).",
               labels=BASE_LABELS + ("phase",)),
)

EXPORTED_METRIC_NAMES: frozenset[str] = frozenset(m.name for m in EXPORTED_METRICS)


def metric_spec(name: str) -> MetricSpec:
    """The spec of an exported metric; KeyError if FleetLM does not export it."""
    for m in EXPORTED_METRICS:
        if m.name == name:
            return m
    raise KeyError(name)


def exposed_base_name(series_name: str) -> str | None:
    """Map an exposed series name to its exported metric name, or None.

    `fleetlm_e2e_request_latency_seconds_count` -> the histogram's name;
    suffixes are stripped only from histograms, so a made-up
    `fleetlm_num_requests_running_sum` stays unknown.
    """
    if series_name in EXPORTED_METRIC_NAMES:
        return series_name
    for suffix in HISTOGRAM_SUFFIXES:
        base = series_name.removesuffix(suffix)
        if base != series_name and base in EXPORTED_METRIC_NAMES \
                and metric_spec(base).kind == "histogram":
            return base
    return None


__all__ = [
    "BASE_LABELS",
    "EXPORTED_METRICS",
    "EXPORTED_METRIC_NAMES",
    "HISTOGRAM_SUFFIXES",
    "MetricSpec",
    "exposed_base_name",
    "metric_spec",
]
