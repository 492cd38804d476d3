"""The one streaming client of the benchmark and drill tooling: an OpenAI SSE completion, read event by event.

:func:`stream_completion` POSTs a request with ``"stream": true`` and reads
``data: {...}`` events to ``data: [DONE]``, recording into a
:class:`StreamResult` what a client saw: the status, the text, the
per-token strings (when ``logprobs`` were asked), the finish reason, the
usage, any SSE error event, and the arrival time (``time.monotonic()``) of
every event that carries a choice (all but a chat stream's opening role
event): a token arrived, even one whose text the server still holds back.
It may walk away after some such events (a client disconnect). aiohttp,
because ``fleetlm bench serve`` runs wherever the server's own dependencies
are installed (Ray Serve brings it).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any


def session(max_connections: int = 0) -> Any:
    """An ``aiohttp.ClientSession`` for :func:`stream_completion` (0: no connection limit);
    create it inside the event loop that uses it, and close it (``async with``)."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max_connections))


@dataclass
class StreamResult:
    """What one client received from a streaming completion."""

    status: int | None = None
    tokens: list[str] = field(default_factory=list)  # per-token strings (logprobs), in order
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)  # SSE error events
    done: bool = False  # saw data: [DONE]
    disconnected: bool = False  # the client left on purpose
    timed_out: bool = False
    transport_error: str | None = None  # the connection failed (exception name), or an event was not JSON
    body: str | None = None  # a non-200 answer
    t_start: float = 0.0
    t_end: float | None = None  # the stream was read to its end
    times: list[float] = field(default_factory=list)  # arrival of each event with a choice
    num_tokens_per_event: list[int] = field(default_factory=list)

    @property
    def ttft_s(self) -> float | None:
        return self.times[0] - self.t_start if self.times else None

    @property
    def e2e_s(self) -> float | None:
        return self.t_end - self.t_start if self.t_end is not None else None

    @property
    def completion_tokens(self) -> int | None:
        return self.usage.get("completion_tokens") if self.usage else None

    @property
    def failure(self) -> str | None:
        """Why the stream did not complete (None if it did): timeout, a transport error,
        ``http_<status>``, ``stream_error`` (an SSE error event) or ``empty_stream``."""
        if self.timed_out:
            return "timeout"
        if self.transport_error is not None:
            return self.transport_error
        if self.status != 200:
            return f"http_{self.status}"
        if self.errors:
            return "stream_error"
        if self.t_end is None:
            return "disconnected" if self.disconnected else "incomplete"
        if not self.times:
            return "empty_stream"
        return None

    def gap_around(self, t: float) -> float | None:
        """Seconds between the last output event before ``t`` and the first after it."""
        before = [x for x in self.times if x <= t]
        after = [x for x in self.times if x > t]
        if not before or not after:
            return None
        return after[0] - before[-1]

    def _event(self, event: dict[str, Any], chat: bool) -> None:
        if "error" in event:
            self.errors.append(event["error"])
            return
        if event.get("usage"):
            self.usage = event["usage"]
        for c in event.get("choices", ()):
            delta = c.get("delta") or {}
            if chat and "role" in delta:
                continue  # a chat stream's opening event: no output yet
            piece = (delta.get("content") or "") if chat else (c.get("text") or "")
            self.text += piece
            lp = c.get("logprobs")
            toks = []
            if lp and not chat:
                toks = lp.get("tokens") or []
            elif lp and chat:
                toks = [e["token"] for e in lp.get("content") or []]
            self.tokens.extend(toks)
            self.times.append(time.monotonic())
            self.num_tokens_per_event.append(len(toks))
            if c.get("finish_reason"):
                self.finish_reason = c["finish_reason"]


async def stream_completion(http: Any, base: str, body: dict[str, Any], headers: dict[str, str] | None = None, *,
                            path: str = "/v1/completions", leave_after_events: int | None = None,
                            timeout_s: float = 300.0, into: StreamResult | None = None) -> StreamResult:
    """POST ``body`` as a streaming request to ``base + path`` over the session ``http`` and read it
    to ``[DONE]`` (or leave after ``leave_after_events`` output events). ``into``: fill this
    result as events arrive (so a watcher sees the progress). Never raises for the server's or
    the network's failures: they are in the result."""
    import aiohttp

    out = into if into is not None else StreamResult()
    out.t_start = time.monotonic()
    chat = path.endswith("/chat/completions")
    try:
        async with http.post(base + path, json={**body, "stream": True}, headers=headers or {},
                             timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            out.status = r.status
            if r.status != 200:
                out.body = (await r.read()).decode(errors="replace")[:500]
                return out
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[len(b"data:"):].strip()
                if data == b"[DONE]":
                    out.done = True
                    break
                out._event(json.loads(data), chat)
                if leave_after_events is not None and len(out.times) >= leave_after_events:
                    out.disconnected = True
                    r.close()  # the server sees the client go away mid-stream
                    return out
            out.t_end = time.monotonic()
    except asyncio.TimeoutError:
        out.timed_out = True
    except aiohttp.ClientError as e:
        out.transport_error = type(e).__name__
    except json.JSONDecodeError:
        out.transport_error = "bad_json"
    return out


__all__ = ["StreamResult", "session", "stream_completion"]
