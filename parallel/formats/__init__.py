"""Weight formats of the linear layers (``base.py`` says what a format is).

A format is one module with a ``LinearMethod`` subclass. The dense format
is ``FORMATS["dense"]``; each quantized format registers a
``Quantization`` under vLLM's ``quantization`` name (``registry.py``) when
its module is imported below: one line per format. ``linear_methods``
picks the method of each layer of a model; the LM head and the embeddings
stay dense in every format (``workers/models`` builds them so).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fleetlm.parallel.formats.base import LinearMethod, ParamSpec
from fleetlm.parallel.formats.dense import DenseMethod
from fleetlm.parallel.formats.registry import (
    QUANTIZATIONS,
    Quantization,
    checkpoint_names,
    quantization_methods,
    register_quantization,
    resolve_quantization,
)

FORMATS: dict[str, type[LinearMethod]] = {"dense": DenseMethod}

# Quantized formats: importing each registers it (one line per format).
from fleetlm.parallel.formats import w8a8  # noqa: E402,F401  fp8, int8
from fleetlm.parallel.formats import compressed_tensors  # noqa: E402,F401


def linear_methods(ops, weight_format: str = "dense",
                   checkpoint_config: dict[str, Any] | None = None) -> Callable[[str], LinearMethod]:
    """``method_for(layer_name)``: the method of each linear layer.

    ``weight_format``: "dense" or a registered quantization name;
    ``checkpoint_config``: config.json's quantization_config (None: a float
    checkpoint, quantized online when the format is not dense).
    """
    if weight_format in FORMATS:
        method = FORMATS[weight_format](ops)
        return lambda layer_name: method
    if weight_format in QUANTIZATIONS:
        return QUANTIZATIONS[weight_format].build(ops, checkpoint_config)
    raise ValueError(f"unknown weight format {weight_format!r}; known: "
                     f"{', '.join([*FORMATS, *quantization_methods()])}")


# Quantized formats: importing each registers it (one line per format).
from fleetlm.parallel.formats import awq, gguf, gptq  # noqa: E402,F401  (after linear_methods: they import this package)

__all__ = ["FORMATS", "QUANTIZATIONS", "DenseMethod", "LinearMethod", "ParamSpec", "Quantization",
           "checkpoint_names", "linear_methods", "quantization_methods", "register_quantization", "resolve_quantization"]
