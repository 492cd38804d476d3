"""Prometheus metrics of the Serve app: built from ``metric_names.EXPORTED_METRICS``.

Each process that serves (an ``LLMReplica``, the ``OpenAIIngress``) owns one
:class:`ServeMetrics` with its own ``CollectorRegistry`` (never the global
default one: several replicas may share a process in tests, and a global
registry is module-level mutable state). Every series carries the labels
``model`` and ``replica``.

Engine state (running/waiting requests, KV usage, prefix-cache counters) is
not pushed: it is read from ``AsyncEngine.stats()`` when scraped, so it is
never stale. Per-request values (latencies, tokens, outcomes) are recorded
by the replica as requests progress.

``/metrics`` on the ingress asks every replica for :meth:`ServeMetrics.collect`
(a list of ``prometheus_client`` metric families, picklable) and renders the
union with :func:`render`: one exposition with one series per replica.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from fleetlm.cluster.metric_names import BASE_LABELS, EXPORTED_METRICS, MetricSpec

__all__ = ["CONTENT_TYPE_LATEST", "ServeMetrics", "merge_families", "render"]

# Metrics read from the engine's stats at scrape time: name -> (EngineStats field, kind).
ENGINE_STATS_METRICS: dict[str, str] = {
    "fleetlm_num_requests_running": "num_running",
    "fleetlm_num_requests_waiting": "num_waiting",
    "fleetlm_kv_cache_usage_ratio": "kv_cache_usage",
    "fleetlm_prefix_cache_queried_tokens_total": "prefix_cache_queried_tokens",
    "fleetlm_prefix_cache_hit_tokens_total": "prefix_cache_hit_tokens",
    "fleetlm_num_preemptions_total": "num_preemptions",
    "fleetlm_lora_resident_adapters": "num_lora_resident",
    "fleetlm_lora_loads_total": "lora_loads",
    "fleetlm_lora_evictions_total": "lora_evictions",
}


class _EngineStatsCollector:
    """Yields the engine-state metrics from a stats snapshot taken at scrape time."""

    def __init__(self, specs: list[MetricSpec], labels: tuple[str, str], stats_fn: Callable[[], Any]) -> None:
        self._specs = specs
        self._labels = list(labels)
        self._stats_fn = stats_fn

    def collect(self) -> Iterable[Metric]:
        stats = self._stats_fn()
        if stats is None:
            return
        for spec in self._specs:
            value = getattr(stats, ENGINE_STATS_METRICS[spec.name], None)
            if value is None:  # a stats object without the field (a test's stand-in engine)
                continue
            value = float(value)
            if spec.kind == "counter":
                fam = CounterMetricFamily(spec.name, spec.help, labels=BASE_LABELS)
            else:
                fam = GaugeMetricFamily(spec.name, spec.help, labels=BASE_LABELS)
            fam.add_metric(self._labels, value)
            yield fam


class ServeMetrics:
    """One process's metrics (labels model, replica), recorded as requests progress.

    ``stats_fn`` returns the engine's current ``EngineStats`` (or None where
    there is no engine, as on the ingress, whose only series are its errors).
    """

    def __init__(self, model: str, replica: str, stats_fn: Callable[[], Any] | None = None) -> None:
        self.model = model
        self.replica = replica
        self.registry = CollectorRegistry(auto_describe=False)
        self._metrics: dict[str, Any] = {}
        pulled: list[MetricSpec] = []
        for spec in EXPORTED_METRICS:
            if spec.name in ENGINE_STATS_METRICS:
                pulled.append(spec)
                continue
            self._metrics[spec.name] = _build(spec, self.registry)
        if stats_fn is not None:
            self.registry.register(_EngineStatsCollector(pulled, (model, replica), stats_fn))

    def _child(self, name: str, *extra: str) -> Any:
        return self._metrics[name].labels(self.model, self.replica, *extra)

    # -- recording -----------------------------------------------------------
    def request_accepted(self, num_prompt_tokens: int) -> None:
        """The replica's engine admitted a request."""
        self._child("fleetlm_prompt_tokens_total").inc(num_prompt_tokens)

    # The ledger (ingress only): accepted once, finished once with its reason.
    def ledger_accepted(self) -> None:
        self._child("fleetlm_requests_accepted_total").inc()

    def ledger_finished(self, reason: str) -> None:
        self._child("fleetlm_requests_finished_total", reason).inc()

    def tokens_generated(self, num_tokens: int, seconds_per_token: float | None) -> None:
        """``num_tokens`` new output tokens; ``seconds_per_token`` after the first token."""
        if num_tokens <= 0:
            return
        self._child("fleetlm_generation_tokens_total").inc(num_tokens)
        if seconds_per_token is not None:
            h = self._child("fleetlm_time_per_output_token_seconds")
            for _ in range(num_tokens):
                h.observe(seconds_per_token)

    def first_token(self, ttft_s: float) -> None:
        self._child("fleetlm_time_to_first_token_seconds").observe(max(0.0, ttft_s))

    def request_finished(self, finish_reason: str | None, e2e_s: float | None) -> None:
        """A request left the engine; "stop"/"length" are successes, anything else an error."""
        if finish_reason in ("stop", "length"):
            self._child("fleetlm_request_success_total", finish_reason).inc()
            if e2e_s is not None:
                self._child("fleetlm_e2e_request_latency_seconds").observe(max(0.0, e2e_s))
        else:
            self.request_error(finish_reason or "error")

    def request_error(self, reason: str) -> None:
        self._child("fleetlm_request_errors_total", reason).inc()

    def lora_request(self, lora_name: str, prompt_tokens: int, generation_tokens: int) -> None:
        """A request that ran with adapter ``lora_name`` finished."""
        self._child("fleetlm_lora_requests_total", lora_name).inc()
        self._child("fleetlm_lora_prompt_tokens_total", lora_name).inc(prompt_tokens)
        self._child("fleetlm_lora_generation_tokens_total", lora_name).inc(generation_tokens)

    def startup(self, phases: dict[str, float]) -> None:
        """Seconds per start-up phase (the replica's, once it is ready)."""
        for phase, seconds in phases.items():
            self._child("fleetlm_startup_seconds", phase).set(seconds)

    # -- export --------------------------------------------------------------
    def collect(self) -> list[Metric]:
        """This process's metric families (picklable, for the ingress to merge)."""
        return list(self.registry.collect())


def _build(spec: MetricSpec, registry: CollectorRegistry) -> Any:
    kw: dict[str, Any] = {"labelnames": spec.labels, "registry": registry}
    if spec.kind == "counter":
        return Counter(spec.name, spec.help, **kw)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.help, **kw)
    return Histogram(spec.name, spec.help, buckets=spec.buckets, **kw)


def merge_families(groups: Iterable[Iterable[Metric]]) -> list[Metric]:
    """Union of several processes' families: one family per name, all their samples.

    Series of different replicas differ by their ``replica`` label, so plain
    concatenation is a valid exposition.
    """
    merged: dict[str, Metric] = {}
    for families in groups:
        for fam in families:
            into = merged.get(fam.name)
            if into is None:
                into = Metric(fam.name, fam.documentation, fam.type, getattr(fam, "unit", ""))
                merged[fam.name] = into
            # `_created` timestamps say when a replica's child series was made;
            # merged over replicas they are noise (and a separate family each).
            into.samples.extend(s for s in fam.samples if not s.name.endswith("_created"))
    return list(merged.values())


class _Static:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def render(groups: Iterable[Iterable[Metric]]) -> bytes:
    """Prometheus text exposition of the merged families, and their vLLM-compatible names
    (``metric_aliases.py``)."""
    from fleetlm.cluster.metric_aliases import vllm_alias_families

    families = merge_families(groups)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Static(families + vllm_alias_families(families)))
    return generate_latest(registry)
