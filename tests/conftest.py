"""Shared test setup (kept light: unit tests must not pay for importing torch)."""

import os

import pytest

import fleetlm  # noqa: F401  first: it takes the checkout off sys.path (see fleetlm/__init__.py)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton picks interpreted vs compiled mode at first import, which may come
# from any test module; without a GPU the kernel tests need the interpreter.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def embedded_model() -> str:
    return "smollm2-135m-instruct"
