"""Keep Ray Serve's access log for requests, not for probes.

Load balancers poll ``/health`` every few seconds, Prometheus scrapes
``/metrics``, the ingress broadcasts ``health`` / ``metrics_families`` to the
replicas, Serve's routers poll routing stats and the CLI's drain polls
``num_inflight`` ten times a second: at INFO each would be a log line, and
they would bury the requests. They are logged at DEBUG instead (Serve's
own ``logging_config: {log_level: DEBUG}`` shows them again); every other
access log line is untouched.
"""

from __future__ import annotations

import logging

# HTTP routes of the ingress and handle methods (ingress and replicas) that are probes.
PROBES = frozenset({
    "/health", "/ping", "/metrics",
    "health", "check_health", "metrics_families", "num_inflight", "record_routing_stats",
    "record_autoscaling_stats",
})


class ProbeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "serve_access_log", False) and getattr(record, "route", None) in PROBES:
            if record.levelno == logging.INFO:
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def quiet_probe_access_logs() -> None:
    """Install the filter on Serve's logger in this (replica) process; idempotent."""
    logger = logging.getLogger("ray.serve")
    if not any(isinstance(f, ProbeFilter) for f in logger.filters):
        logger.addFilter(ProbeFilter())
