"""HTTP plumbing of the ingress, apart from any OpenAI meaning: API key, body limit, strict JSON, SSE, errors.

- :func:`authenticate`: ``Authorization: Bearer <key>``, compared in constant
  time (401);
- :func:`read_json`: the body up to a limit (413, by Content-Length and by
  the bytes actually received), JSON media type only (415), strict UTF-8
  and JSON (400, never a 500: deep nesting, huge integer literals and lone
  UTF-16 surrogate escapes included);
- :class:`SSEResponse`, :func:`sse`, :data:`SSE_DONE`: server-sent events;
- :func:`error_response` and :func:`install_error_handlers`: every error,
  the framework's own 404/405 included, in OpenAI's error body.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleetlm.cluster import errors
from fleetlm.cluster.errors import OpenAIError

logger = logging.getLogger("fleetlm.ingress")

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def authenticate(request: Request, api_key: bytes | None) -> None:
    """Nothing when no key is configured or the request carries it; else a 401."""
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    given = token.strip().encode("latin-1", errors="replace") if scheme.lower() == "bearer" else b""
    # Constant time in the key's content: no early exit on the first differing byte.
    if not hmac.compare_digest(given, api_key):
        raise errors.unauthorized("Missing API key." if not header else "Invalid API key.")


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, at most ``limit`` bytes."""
    ctype = request.headers.get("content-type")
    if ctype is not None:
        media = ctype.split(";", 1)[0].strip().lower()
        if media and media != "application/json" and not media.endswith("+json"):
            raise errors.unsupported_media_type(media)
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise errors.bad_request("Invalid Content-Length header.") from None
        if size > limit:
            raise errors.request_too_large(limit)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise errors.request_too_large(limit)
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        raise errors.bad_request(f"The request body is not valid UTF-8 (byte {e.start}).") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise errors.bad_request(f"The request body is not valid JSON: {e.msg} at position {e.pos}.") from None
    except RecursionError:
        raise errors.bad_request("The request body is nested too deeply.") from None
    except ValueError as e:  # e.g. an integer literal of thousands of digits
        raise errors.bad_request(f"The request body is not valid JSON: {e}") from None
    if _SURROGATE_ESCAPE.search(text):
        # A lone "\ud800" escape decodes to a string no encoder accepts: refuse it
        # here rather than fail (500) when tokenizing or echoing it.
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise errors.bad_request("The request body contains an unpaired UTF-16 surrogate escape.") from None
    return data


class SSEResponse(StreamingResponse):
    """StreamingResponse that always runs ``on_close`` (even if never iterated)."""

    def __init__(self, body: Any, on_close: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status_code, headers=e.headers or None)


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI error bodies for our errors, the framework's (404, 405) and the unexpected (500)."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        if kind is not None:
            return error_response(OpenAIError.of(kind, f"{request.method} {request.url.path}: {exc.detail}"))
        return error_response(OpenAIError(exc.status_code, str(exc.detail), "invalid_request_error"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(errors.internal())


__all__ = ["SSEResponse", "SSE_DONE", "authenticate", "error_response", "install_error_handlers", "read_json", "sse"]
