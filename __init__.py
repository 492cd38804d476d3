"""FleetLM: distributed LLM serving on Ray.

Offline use mirrors vLLM's API::

    from fleetlm import LLM, SamplingParams
    llm = LLM(model="smollm2-135m-instruct")
    print(llm.generate(["Hello"], SamplingParams(max_tokens=16))[0].outputs[0].text)
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: importing fleetlm (e.g. for fleetlm.engine.block_hash in the router)
    # must not pull torch and the model stack.
    if name == "LLM":
        from fleetlm.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from fleetlm.engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "AsyncEngine":
        from fleetlm.engine.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(f"module 'fleetlm' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "AsyncEngine"]
