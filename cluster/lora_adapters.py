"""LoRA adapters on the ingress: which adapter names exist, on which base model, under which id.

A client picks an adapter by sending its name as ``model`` (vLLM's
convention); the ingress resolves it here to the base model's replicas and
a ``LoRARequest`` that travels with the request (through a migration too),
so any replica can serve any adapter: one that has not read it yet checks
and reads it on first use. Adapters come from the config (``lora_modules``
of a model entry, read by every replica at start) or from
``POST /v1/load_lora_adapter`` (``server.py``), which has every replica
check and read it first and answers 400 with the reason if one cannot.

``lora_int_id`` is a hash of (name, path): the ingress and every replica
derive the same id without talking, a restarted ingress gets the same ids
again, and re-loading a name from another path is a new adapter (a new
prefix-cache key: blocks computed under the old weights never serve it).

No Ray and no torch here: the ingress's unit tests drive it over fake backends.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import PlainTextResponse, Response

from fleetlm.cluster import errors
from fleetlm.cluster.protocol import Strict, parse_request
from fleetlm.engine.lora import LoRARequest


def adapter_id(name: str, path: str) -> int:
    """A positive 63-bit id of the adapter ``name`` at ``path`` (the same everywhere)."""
    digest = hashlib.blake2b(f"{name}\x00{path}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 1) or 1


def lora_request(name: str, path: str, base: str) -> LoRARequest:
    return LoRARequest(name, adapter_id(name, path), path, base_model_name=base)


@dataclass(frozen=True)
class Adapter:
    request: LoRARequest
    base: str  # the served model it adapts

    @property
    def name(self) -> str:
        return self.request.lora_name


class AdapterRegistry:
    """Adapter name -> ``Adapter``, over every served model (names share the ``model`` namespace)."""

    def __init__(self, model_names: tuple[str, ...], modules: dict[str, tuple[tuple[str, str], ...]]) -> None:
        self.model_names = set(model_names)
        self.adapters: dict[str, Adapter] = {}
        for base, entries in modules.items():
            for name, path in entries:
                self.check_new(name)
                self.adapters[name] = Adapter(lora_request(name, path, base), base)

    def check_new(self, name: str) -> None:
        """ValueError if ``name`` cannot be a new adapter's name."""
        if name in self.model_names:
            raise ValueError(f"'{name}' is the name of a served model; an adapter needs its own name")
        if name in self.adapters:
            raise ValueError(f"The lora adapter '{name}' has already been loaded.")

    def get(self, name: str) -> Adapter | None:
        return self.adapters.get(name)

    def add(self, adapter: Adapter) -> None:
        self.check_new(adapter.name)
        self.adapters[adapter.name] = adapter

    def remove(self, name: str) -> Adapter | None:
        return self.adapters.pop(name, None)

    def of_model(self, base: str) -> list[Adapter]:
        return [a for a in self.adapters.values() if a.base == base]


# --- the two routes (vLLM's) -------------------------------------------------------------


class LoadLoRAAdapterRequest(Strict):
    lora_name: str
    lora_path: str
    # Which served model it adapts; needed only when several models enable LoRA.
    base_model_name: str | None = None

    def check(self) -> None:
        for field in ("lora_name", "lora_path"):
            if not getattr(self, field).strip():
                raise errors.bad_request(f"Invalid value for '{field}': must not be empty.", field)


class UnloadLoRAAdapterRequest(Strict):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's optional id; names are unique here

    def check(self) -> None:
        pass


async def load_lora_adapter(server: Any, request: Request) -> Response:
    """``POST /v1/load_lora_adapter {"lora_name", "lora_path"}``: every replica of the base model
    checks and reads the adapter; 400 with the reason if one cannot (or the name is taken)."""
    server.authenticate(request)
    req = parse_request(LoadLoRAAdapterRequest, await server.read_json(request))
    base = _base_model(server, req.base_model_name)
    try:
        server.adapters.check_new(req.lora_name)
    except ValueError as e:
        raise errors.bad_request(str(e), "lora_name") from None
    adapter = Adapter(lora_request(req.lora_name, req.lora_path, base), base)
    backend = server.backends[base]
    results = await backend.add_lora(adapter.request)
    answered = [r for r in results if r is None or isinstance(r, str)]
    if not answered:
        raise errors.unavailable(f"No replica of model '{base}' answered; the adapter was not loaded.")
    reasons = [r for r in answered if r]
    if reasons:
        await backend.remove_lora(adapter.request.lora_int_id)  # those that read it forget it again
        raise errors.bad_request(f"Cannot load LoRA adapter '{req.lora_name}': {reasons[0]}", "lora_path")
    try:
        server.adapters.add(adapter)
    except ValueError as e:  # the same name loaded meanwhile
        raise errors.bad_request(str(e), "lora_name") from None
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")


async def unload_lora_adapter(server: Any, request: Request) -> Response:
    """``POST /v1/unload_lora_adapter {"lora_name"}``: new requests naming it get 404 from now on;
    those already running finish with it. 404 for an unknown name."""
    server.authenticate(request)
    req = parse_request(UnloadLoRAAdapterRequest, await server.read_json(request))
    adapter = server.adapters.get(req.lora_name)
    if adapter is None or (req.lora_int_id is not None and req.lora_int_id != adapter.request.lora_int_id):
        raise errors.OpenAIError.of("not_found", f"The lora adapter '{req.lora_name}' cannot be found.",
                                    "lora_name")
    server.adapters.remove(req.lora_name)
    await server.backends[adapter.base].remove_lora(adapter.request.lora_int_id)
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")


def _base_model(server: Any, name: str | None) -> str:
    lora_models = server.lora_models
    if name is None:
        if len(lora_models) == 1:
            return lora_models[0]
        raise errors.bad_request(f"base_model_name is required: models {', '.join(lora_models)} serve LoRA "
                                 "adapters", "base_model_name")
    if name not in lora_models:
        raise errors.bad_request(f"Model '{name}' does not serve LoRA adapters (served with enable_lora: "
                                 f"{', '.join(lora_models) or 'none'})", "base_model_name")
    return name


def _op(summary: str, props: dict[str, Any], required: list[str], codes: dict[str, str]) -> dict[str, Any]:
    body = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    responses = {"200": {"description": "Done.", "content": {"text/plain": {"schema": {"type": "string"}}}}}
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    responses.update({code: {"description": text, **error} for code, text in codes.items()})
    return {"post": {"summary": summary, "responses": responses,
                     "requestBody": {"required": True, "content": {"application/json": {"schema": body}}}}}


_NAME = {"type": "string", "minLength": 1}
# The two routes in /openapi.json (where LoRA is on).
LORA_PATHS: dict[str, Any] = {
    "/v1/load_lora_adapter": _op(
        "Check and read a PEFT LoRA adapter on every replica of its base model",
        {"lora_name": _NAME, "lora_path": _NAME, "base_model_name": {"type": ["string", "null"]}},
        ["lora_name", "lora_path"],
        {"400": "Name taken, or the adapter refused (missing, bad, rank too high, module the model lacks).",
         "401": "Missing or invalid API key.", "503": "No replica answered."}),
    "/v1/unload_lora_adapter": _op(
        "Forget an adapter; requests running with it finish",
        {"lora_name": _NAME, "lora_int_id": {"type": ["integer", "null"]}}, ["lora_name"],
        {"400": "Invalid body.", "401": "Missing or invalid API key.", "404": "No such adapter."}),
}


def adapter_card(adapter: Adapter, created: int) -> dict[str, Any]:
    """An adapter in ``/v1/models``: vLLM's card, its base model as ``parent``."""
    return {"id": adapter.name, "object": "model", "created": created, "owned_by": "fleetlm",
            "root": adapter.request.lora_path, "parent": adapter.base}


__all__ = ["LORA_PATHS", "Adapter", "AdapterRegistry", "adapter_card", "adapter_id", "load_lora_adapter", "lora_request",
           "unload_lora_adapter"]
