"""FleetLM: distributed LLM serving on Ray.

Offline use mirrors vLLM's API::

    from fleetlm import LLM, SamplingParams
    llm = LLM(model="smollm2-135m-instruct")
    print(llm.generate(["Hello"], SamplingParams(max_tokens=16))[0].outputs[0].text)
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# This package's folder is the repository root. Put on sys.path (`python -m
# pytest` or `python -c` run in a checkout; a Ray worker, which gets its
# driver's working directory) it would make engine/, kernels/, workers/ ...
# importable as top-level modules, and `kernels` then shadows Hugging Face's
# package of that name, which transformers imports. Nothing may import them so.
_HERE = _os.path.dirname(_os.path.abspath(__file__))
_sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _HERE]


def __getattr__(name):
    # Lazy: importing fleetlm (e.g. for fleetlm.engine.block_hash in the router)
    # must not pull torch and the model stack.
    if name == "LLM":
        from fleetlm.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from fleetlm.engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "GuidedDecodingParams":
        from fleetlm.engine.sampling_params import GuidedDecodingParams

        return GuidedDecodingParams
    if name == "LoRARequest":
        from fleetlm.engine.lora import LoRARequest

        return LoRARequest
    if name == "AsyncEngine":
        from fleetlm.engine.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(f"module 'fleetlm' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "GuidedDecodingParams", "LoRARequest", "AsyncEngine"]
