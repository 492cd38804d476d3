"""Model resolution, weight loading and tokenizers.

    source = resolve_model("smollm2-135m-instruct")       # -> ModelSource
    tokenizer = load_tokenizer(source)                     # HF tokenizer, chat template set
    for name, lazy in iter_weights(source, device=..., dtype=...):
        param.copy_(lazy.load(rows=shard_rows))            # reads only the shard

Sources: the embedded GGUF default, local HF safetensors directories, .gguf
files, hub ids already in the local HF cache, and `load_format="dummy"`
random weights in the shapes of configs/models/*.json.
"""

from fleetlm.workers.loader.lazy import LazyTensor
from fleetlm.workers.loader.source import (
    EMBEDDED_DEFAULT,
    LOAD_FORMATS,
    ModelSource,
    dummy_config_names,
    embedded_gguf_path,
    resolve_model,
)
from fleetlm.workers.loader.tokenizer import load_tokenizer, model_tokenizer
from fleetlm.workers.loader.weights import iter_weights

__all__ = [
    "EMBEDDED_DEFAULT",
    "LOAD_FORMATS",
    "LazyTensor",
    "ModelSource",
    "dummy_config_names",
    "embedded_gguf_path",
    "iter_weights",
    "load_tokenizer",
    "model_tokenizer",
    "resolve_model",
]
