"""OpenAI-style error bodies and the one exception type the HTTP layer turns into them.

Every error the service returns has OpenAI's shape::

    {"error": {"message": "...", "type": "...", "param": "max_tokens" | null, "code": ... | null}}

so the official clients raise the right exception class (they dispatch on the
status code) and show the message. Code anywhere below the route handlers
raises :class:`OpenAIError`; one handler renders it. Client mistakes are
always 4xx: a 500 means a bug on our side.
"""

from __future__ import annotations

import json
from typing import Any

# (status, type, code) of the errors we return, by name, so call sites read as intent.
_KINDS: dict[str, tuple[int, str, str | None]] = {
    "invalid_request": (400, "invalid_request_error", None),
    "unauthorized": (401, "authentication_error", "invalid_api_key"),
    "model_not_found": (404, "not_found_error", "model_not_found"),
    "not_found": (404, "not_found_error", None),
    "method_not_allowed": (405, "invalid_request_error", None),
    "request_too_large": (413, "invalid_request_error", "request_too_large"),
    "unsupported_media_type": (415, "invalid_request_error", "unsupported_media_type"),
    "queue_full": (429, "rate_limit_error", "queue_full"),
    "internal": (500, "internal_error", None),
    "unavailable": (503, "service_unavailable", "unavailable"),
    "draining": (503, "service_unavailable", "draining"),
}


class OpenAIError(Exception):
    """An error with its HTTP status and OpenAI body; raised anywhere, rendered once."""

    # True once some process has counted it in fleetlm_request_errors_total.
    counted: bool = False

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    @classmethod
    def of(
        cls,
        kind: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> OpenAIError:
        status, type_, code = _KINDS[kind]
        return cls(status, message, type_, param=param, code=code, headers=headers)

    @property
    def reason(self) -> str:
        """Short label for ``fleetlm_request_errors_total{reason}``."""
        return self.code or self.type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError.of("invalid_request", message, param)


def unauthorized(message: str = "Missing or invalid API key.") -> OpenAIError:
    return OpenAIError.of("unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError.of("model_not_found", f"The model `{model}` does not exist.", "model")


def request_too_large(limit: int) -> OpenAIError:
    return OpenAIError.of("request_too_large", f"Request body is larger than the limit of {limit} bytes.")


def unsupported_media_type(media_type: str) -> OpenAIError:
    return OpenAIError.of("unsupported_media_type",
                          f"Content-Type {media_type!r} is not supported: send application/json.")


def queue_full(retry_after_s: int = 1) -> OpenAIError:
    return OpenAIError.of(
        "queue_full",
        "The server is overloaded: too many requests are waiting. Retry later.",
        headers={"Retry-After": str(max(1, int(retry_after_s)))},
    )


def draining() -> OpenAIError:
    return OpenAIError.of("draining", "The server is shutting down and accepts no new requests.")


def unavailable(message: str) -> OpenAIError:
    return OpenAIError.of("unavailable", message)


def internal(message: str = "Internal server error.") -> OpenAIError:
    return OpenAIError.of("internal", message)


def sse_error_event(err: OpenAIError) -> str:
    """The SSE event a stream ends with when it fails after its 200 was sent."""
    return f"data: {json.dumps(err.body())}\n\n"
