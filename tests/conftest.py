"""Shared test setup (kept light: unit tests must not pay for importing torch)."""

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedded_model() -> str:
    return "smollm2-135m-instruct"
