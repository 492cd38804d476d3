"""Shared test setup (kept light: unit tests must not pay for importing torch)."""

import os

import pytest

import fleetlm  # noqa: F401  first: it takes the checkout off sys.path (see fleetlm/__init__.py)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One Ray authentication mode for the whole run, in every process the tests start: their clusters
# are on loopback and torn down by the tests, so no token. Ray caches the mode per process; the
# node-autoscaling test must turn tokens off for its `ray start` cluster, and with the mode left
# to Ray (token auth by default once ~/.ray/auth_token exists) every cluster a later test started
# refused this process' unauthenticated calls ("Failed to start GCS ... InvalidAuthToken").
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Triton picks interpreted vs compiled mode at first import, which may come
# from any test module; without a GPU the kernel tests need the interpreter.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def embedded_model() -> str:
    return "smollm2-135m-instruct"
