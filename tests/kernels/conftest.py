"""Kernel tests: Triton kernels against their torch references.

Without CUDA the Triton kernels run in triton's CPU interpreter
(``TRITON_INTERPRET=1``); with CUDA they run compiled on the GPU.

Triton picks interpreted vs compiled when a function is *decorated*, i.e. when
its module is imported, and that includes triton's own ``tl.sum``, ``tl.max``,
``tl.zeros`` (jit functions of ``triton.language.standard``). So the variable
must be set before anything imports triton. This file sets it and reloads our
kernel modules if an earlier test module imported them; but if triton itself
was already imported without the variable (e.g. ``pytest tests`` collecting a
model test first), the interpreter cannot work in this process and the tests
marked ``triton`` are skipped with that reason. Setting ``TRITON_INTERPRET=1``
in ``tests/conftest.py`` (or the environment) avoids that.
"""

import importlib
import os
import sys

import pytest
import torch

_KERNEL_MODULES = (
    "fleetlm.kernels.rmsnorm",
    "fleetlm.kernels.rotary",
    "fleetlm.kernels.activation",
    "fleetlm.kernels.gemv",
    "fleetlm.kernels.kv_cache",
    "fleetlm.kernels.attention",
    "fleetlm.kernels.token_bitmask",
    "fleetlm.kernels.quant",
    "fleetlm.kernels.qlinear",
    "fleetlm.kernels.lora",
)

_CUDA = torch.cuda.is_available()
_TRITON_IMPORTED_COMPILED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"

if not _CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    # Only when the variable came too late: reloading a module that was imported with it set makes
    # a second copy of its classes (quant.QuantizedActivation), which code holding the first copy
    # no longer recognizes (the W8A8 integration tests failed in a full run that way).
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in _KERNEL_MODULES:
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])

try:
    import triton  # noqa: F401

    _HAS_TRITON = True
except ImportError:
    _HAS_TRITON = False


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs Triton kernels (compiled on CUDA, interpreted on CPU)")


def pytest_collection_modifyitems(config, items):
    if not _HAS_TRITON:
        reason = "triton is not importable"
    elif not _CUDA and _TRITON_IMPORTED_COMPILED:
        reason = ("triton was imported before TRITON_INTERPRET=1 was set, so its interpreter cannot run here: "
                  "run tests/kernels on its own or set TRITON_INTERPRET=1 before pytest starts")
    else:
        return
    for item in items:
        if "triton" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where kernels run: the GPU when there is one, else the CPU (interpreter)."""
    return torch.device("cuda" if _CUDA else "cpu")
