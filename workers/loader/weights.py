"""iter_weights: one entry point over every kind of ModelSource.

Yields (HF parameter name, LazyTensor) pairs; nothing is read until the
caller loads a tensor (or a shard of it), so the caller decides what to read
and where it goes. A tqdm bar over tensors appears only when the whole load
takes more than a second (the caller's loads happen between yields).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from fleetlm.workers.loader.dummy import iter_dummy_weights
from fleetlm.workers.loader.gguf_format import read_gguf_header
from fleetlm.workers.loader.gguf_model import iter_gguf_weights
from fleetlm.workers.loader.hf_weights import iter_hf_weights
from fleetlm.workers.loader.lazy import LazyTensor
from fleetlm.workers.loader.source import ModelSource


def iter_weights(
    source: ModelSource,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    keep_quantized: bool = False,
) -> Iterator[tuple[str, LazyTensor]]:
    """(HF name, LazyTensor) for every stored weight of `source`; loads give
    `dtype` tensors on `device`. A tied lm_head is not yielded (as in HF
    checkpoints): the model ties it to model.embed_tokens.weight. `seed` only
    matters for dummy weights; `keep_quantized` gives a GGUF file's projections
    as raw blocks (quantization="gguf"). Bad arguments raise here, not on first next()."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point type, got {dtype}")
    device = torch.device(device)
    if source.kind == "hf":
        tensors = list(iter_hf_weights(Path(source.path), device=device, dtype=dtype))
    elif source.kind == "gguf":
        header = read_gguf_header(source.path)
        tensors = list(iter_gguf_weights(header, source.hf_config, device=device, dtype=dtype,
                                         keep_quantized=keep_quantized))
    elif source.kind == "dummy":
        tensors = list(iter_dummy_weights(source.hf_config, device=device, dtype=dtype, seed=seed))
    else:
        raise ValueError(f"unknown ModelSource kind {source.kind!r}")
    return iter(tqdm(tensors, desc=f"Loading {source.name}", unit="tensor", delay=1.0, leave=False))
