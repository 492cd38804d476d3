"""Model definitions, one file per architecture family."""

from fleetlm.workers.loader.source import SUPPORTED_ARCHITECTURES
from fleetlm.workers.models.llama import LlamaForCausalLM

# HF `architectures` names served by each implementation (the loader refuses others early).
ARCHITECTURES = dict.fromkeys(SUPPORTED_ARCHITECTURES, LlamaForCausalLM)


def model_class(hf_config: dict):
    archs = hf_config.get("architectures") or ["LlamaForCausalLM"]
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise ValueError(f"unsupported architecture {archs}; supported: {sorted(ARCHITECTURES)}")
