"""Weight formats of the linear layers (``base.py`` says what a format is).

A format is one module with a ``LinearMethod`` subclass, registered in
``FORMATS``; ``linear_methods`` picks the method of each layer of a model.
Today every layer is dense; quantized formats choose per layer (an LM head
or the embeddings may stay dense).
"""

from __future__ import annotations

from collections.abc import Callable

from fleetlm.parallel.formats.base import LinearMethod, ParamSpec
from fleetlm.parallel.formats.dense import DenseMethod

FORMATS: dict[str, type[LinearMethod]] = {"dense": DenseMethod}


def linear_methods(ops, weight_format: str = "dense") -> Callable[[str], LinearMethod]:
    """``method_for(layer_name)``: the method of each linear layer (one shared instance per format)."""
    try:
        method = FORMATS[weight_format](ops)
    except KeyError:
        raise ValueError(f"unknown weight format {weight_format!r}; known: {', '.join(sorted(FORMATS))}") from None
    return lambda layer_name: method


__all__ = ["FORMATS", "DenseMethod", "LinearMethod", "ParamSpec", "linear_methods"]
