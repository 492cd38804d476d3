"""How the ingress reaches one model's replicas: a Ray Serve ``DeploymentHandle`` behind :class:`ModelBackend`.

The HTTP server (``server.py``) sees only this surface (``info``,
``generate``, ``health``, ``metrics``, ``invariants``), so its tests run
over a fake backend without Ray. :func:`map_exception` turns what a replica
stream raises (Serve's back-pressure, a dead actor) into the client's error.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fleetlm.cluster import errors
from fleetlm.cluster.errors import OpenAIError
from fleetlm.cluster.messages import GenerateRequest, ModelInfo, ReplicaHealth

logger = logging.getLogger("fleetlm.ingress")

CONTROL_TIMEOUT_S = 5.0
LORA_LOAD_TIMEOUT_S = 120.0  # every replica reads the adapter's files (hub ids download)


class ModelBackend:
    """One model's replicas behind a Ray Serve ``DeploymentHandle``."""

    def __init__(self, name: str, handle: Any) -> None:
        self.name = name
        self._handle = handle
        self._stream_handle = handle.options(stream=True)
        self._info: asyncio.Future | None = None

    async def info(self) -> ModelInfo:
        """The model's tokenizer and limits, fetched once from a replica."""
        if self._info is None:
            self._info = asyncio.ensure_future(self._handle.model_info.remote())
        try:
            return await asyncio.shield(self._info)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._info = None  # retry on the next request (replica not up yet)
            raise

    def cached_info(self) -> ModelInfo | None:
        if self._info is not None and self._info.done() and not self._info.exception():
            return self._info.result()
        return None

    def generate(self, req: GenerateRequest) -> Any:
        """An async iterator of GenerateChunk with ``cancel()``."""
        return self._stream_handle.generate.remote(req)

    async def _broadcast(self, method: str, *args: Any, timeout_s: float = CONTROL_TIMEOUT_S) -> list[Any]:
        return await self._handle.broadcast(method, *args).results_async(timeout_s=timeout_s, return_exceptions=True)

    async def _ask_running(self, method: str) -> list[Any]:
        """Every running replica's answer; none when no replica runs (scaled to zero, or
        failed to deploy: Serve says "unavailable" for both)."""
        from ray.serve.exceptions import DeploymentUnavailableError

        try:
            return await self._broadcast(method)
        except DeploymentUnavailableError:
            return []

    async def add_lora(self, lora_request: Any) -> list[Any]:
        """Every replica checks and reads the adapter: per replica None (done), the reason it
        could not, or the exception of a replica that did not answer."""
        return await self._broadcast("add_lora", lora_request, timeout_s=LORA_LOAD_TIMEOUT_S)

    async def remove_lora(self, lora_int_id: int) -> list[Any]:
        return await self._broadcast("remove_lora", lora_int_id)

    async def health(self) -> list[ReplicaHealth]:
        return [r if isinstance(r, ReplicaHealth) else ReplicaHealth("?", False, repr(r))
                for r in await self._ask_running("health")]

    async def metrics(self) -> list[list[Any]]:
        return [r for r in await self._ask_running("metrics_families") if isinstance(r, list)]

    async def invariants(self) -> list[dict[str, Any]]:
        return [r if isinstance(r, dict) else {"replica": "?", "ok": False, "idle": False,
                                               "violations": [f"no answer: {r!r}"]}
                for r in await self._ask_running("invariants")]


def map_exception(e: BaseException) -> OpenAIError:
    """An exception from a replica stream (not an in-band error) -> OpenAIError."""
    if isinstance(e, OpenAIError):
        return e
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    if isinstance(e, serve_exc.BackPressureError):
        return errors.queue_full()
    if isinstance(e, (serve_exc.DeploymentUnavailableError, ray_exc.RayActorError,
                      getattr(ray_exc, "ActorUnavailableError", ray_exc.RayActorError))):
        return errors.unavailable("No replica of the model is available; retry later.")
    logger.error("replica stream failed: %r", e)
    return errors.internal(f"Generation failed: {type(e).__name__}.")


__all__ = ["CONTROL_TIMEOUT_S", "ModelBackend", "map_exception"]
