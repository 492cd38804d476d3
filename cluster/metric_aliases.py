"""vLLM-compatible names for FleetLM's metrics, exposed beside the ``fleetlm_`` ones.

Alert rules and dashboards written for vLLM (llm-d's, vLLM's own Grafana
examples, KEDA/HPA triggers on ``vllm:num_requests_waiting``) query
``vllm:``-prefixed series with a ``model_name`` label. Where a FleetLM
metric measures the same thing, ``/metrics`` also carries it under vLLM's
name, same values and same type, so those work against FleetLM unchanged.

Label mapping: ``model`` -> ``model_name`` (vLLM's), ``finish_reason`` ->
``finished_reason`` (vLLM's ``request_success_total``); ``replica`` stays,
so every replica's series remains distinct. Histograms keep FleetLM's
buckets (``histogram_quantile`` does not care which). FleetLM's own
``fleetlm_`` names stay the primary ones (the Grafana dashboard, the alert
rules and the tests use them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client.core import Metric
from prometheus_client.samples import Sample

# FleetLM exported name -> the vLLM names of the same quantity.
VLLM_ALIASES: Mapping[str, tuple[str, ...]] = {
    "fleetlm_time_to_first_token_seconds": ("vllm:time_to_first_token_seconds",),
    # vLLM v1 renamed TPOT to inter-token latency and kept the old name.
    "fleetlm_time_per_output_token_seconds": ("vllm:time_per_output_token_seconds",
                                              "vllm:inter_token_latency_seconds"),
    "fleetlm_e2e_request_latency_seconds": ("vllm:e2e_request_latency_seconds",),
    "fleetlm_num_requests_running": ("vllm:num_requests_running",),
    "fleetlm_num_requests_waiting": ("vllm:num_requests_waiting",),
    # kv_cache_usage_perc is v1's name, gpu_cache_usage_perc v0's; both are a 0..1 fraction.
    "fleetlm_kv_cache_usage_ratio": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "fleetlm_prompt_tokens_total": ("vllm:prompt_tokens_total",),
    "fleetlm_generation_tokens_total": ("vllm:generation_tokens_total",),
    "fleetlm_prefix_cache_queried_tokens_total": ("vllm:prefix_cache_queries_total",),
    "fleetlm_prefix_cache_hit_tokens_total": ("vllm:prefix_cache_hits_total",),
    "fleetlm_num_preemptions_total": ("vllm:num_preemptions_total",),
    "fleetlm_request_success_total": ("vllm:request_success_total",),
    # vLLM v1's speculative decoding counters (a "draft" is one request's verified proposals).
    "fleetlm_spec_decode_verifies_total": ("vllm:spec_decode_num_drafts_total",),
    "fleetlm_spec_decode_proposed_tokens_total": ("vllm:spec_decode_num_draft_tokens_total",),
    "fleetlm_spec_decode_accepted_tokens_total": ("vllm:spec_decode_num_accepted_tokens_total",),
}

LABEL_RENAMES: Mapping[str, str] = {"model": "model_name", "finish_reason": "finished_reason"}


def _family_name(exported: str, kind: str) -> str:
    # prometheus_client names a counter's family without its "_total" sample suffix.
    return exported.removesuffix("_total") if kind == "counter" else exported


def _exported_name(family: Metric) -> str:
    return family.name + "_total" if family.type == "counter" else family.name


def vllm_alias_families(families: Iterable[Metric]) -> list[Metric]:
    """The ``vllm:`` copies of those of ``families`` that have a vLLM name (merged families,
    as :func:`fleetlm.cluster.metrics.merge_families` returns them)."""
    out = []
    for fam in families:
        aliases = VLLM_ALIASES.get(_exported_name(fam), ())
        for alias in aliases:
            into = Metric(_family_name(alias, fam.type), f"vLLM-compatible name of {_exported_name(fam)}. "
                          + fam.documentation, fam.type)
            for s in fam.samples:
                suffix = s.name[len(fam.name):]
                labels = {LABEL_RENAMES.get(k, k): v for k, v in s.labels.items()}
                into.samples.append(Sample(into.name + suffix, labels, s.value, s.timestamp, s.exemplar))
            out.append(into)
    return out


__all__ = ["LABEL_RENAMES", "VLLM_ALIASES", "vllm_alias_families"]
