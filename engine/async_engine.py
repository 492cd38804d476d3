"""``AsyncEngine``: the engine for online serving.

The ``LLMEngine`` runs in a background thread that owns all scheduler state;
asyncio callers talk to it through two thread-safe inboxes (new requests,
aborts) and get their outputs back on their own event loop. Model steps
release the GIL inside torch, so the event loop stays responsive while the
device works. Outputs are cumulative, so a slow consumer only ever sees the
latest one (no unbounded per-request queue), and a consumer may ask for
fewer, larger outputs (``coalesce_s``) without losing anything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
import time
from collections.abc import AsyncIterator, Callable

from fleetlm.engine.args import EngineArgs
from fleetlm.engine.block_hash import block_hash_id
from fleetlm.engine.llm_engine import EngineStats, LLMEngine
from fleetlm.engine.lora import LoRARequest
from fleetlm.engine.outputs import RequestOutput
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.engine.snapshot import EngineSnapshot


# Text longer than this (characters) is tokenized in a worker thread, so the
# event loop never stalls on a long prompt (~1 ms per few thousand chars).
# The ingress uses the same bound.
TOKENIZE_OFF_LOOP_CHARS = 4096


class EngineDeadError(RuntimeError):
    """The engine loop died or stopped making progress; every in-flight request fails with it."""


class _Stream:
    """Latest cumulative output of one request, handed across threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.event = asyncio.Event()  # a new output (or error) since the consumer last looked
        self.final = asyncio.Event()  # the last output (or an error) has arrived
        self.latest: RequestOutput | None = None
        self.error: BaseException | None = None

    def _set(self, out: RequestOutput | None, error: BaseException | None) -> None:
        if error is not None:
            self.error = error
            self.final.set()
        else:
            self.latest = out
            if out.finished:
                self.final.set()
        self.event.set()

    def put(self, out: RequestOutput | None = None, error: BaseException | None = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self._set, out, error)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine, stuck_after_s: float = 120.0) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.startup_seconds = engine.startup_seconds
        self.model_config = engine.model_config
        self.config = engine.config
        self.stuck_after_s = stuck_after_s
        self._lock = threading.Lock()
        self._adds: list = []
        self._aborts: list[str] = []
        self._lora_removals: list[int] = []
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._dead: BaseException | None = None
        self._stopped = False
        self._busy_since: float | None = None
        self._heartbeat = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="fleetlm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, **kwargs) -> AsyncEngine:
        return cls(LLMEngine(args.create_engine_config()), **kwargs)

    # -- client side (event loop) ----------------------------------------------------
    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        prior_output_token_ids: list[int] | None = None,
        coalesce_s: Callable[[], float] | None = None,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs of one request; the last has ``finished=True``.

        ``coalesce_s()``, asked after each yield, is the least time before the
        next one: outputs arriving sooner wait and merge into one (the first
        and the final output are never held back). Raises ValueError before
        the first yield for a request that can never run (a bad adapter
        included). Leaving the iteration early (client gone) aborts the request.
        """
        self._raise_if_dead()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        # An adapter seen for the first time is checked on disk: off the loop too.
        new_lora = lora_request is not None and lora_request.lora_int_id not in self.engine.list_loras()
        make = functools.partial(self.engine.make_group, request_id, prompt, params, prior_output_token_ids,
                                 **({"lora_request": lora_request} if lora_request is not None else {}))
        if new_lora or (isinstance(prompt, str) and len(prompt) > TOKENIZE_OFF_LOOP_CHARS):
            group = await asyncio.get_running_loop().run_in_executor(None, make)
        else:
            group = make()
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        with self._lock:
            self._adds.append(group)
        self._wake.set()
        finished = False
        loop = asyncio.get_running_loop()
        next_at = 0.0  # loop time before which a non-final output waits
        try:
            while True:
                await stream.event.wait()
                wait = next_at - loop.time()
                if wait > 0 and not stream.final.is_set():
                    try:
                        await asyncio.wait_for(stream.final.wait(), wait)
                    except TimeoutError:
                        pass
                stream.event.clear()
                if stream.error is not None:
                    raise stream.error
                out = stream.latest
                finished = out.finished
                yield out
                if finished:
                    return
                if coalesce_s is not None:
                    next_at = loop.time() + coalesce_s()
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._request_abort(request_id)

    # -- adapters ------------------------------------------------------------------
    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Check an adapter and read it into the workers' host memory (off the event loop);
        raises ``LoRAAdapterError`` for a bad one. False if it was already added."""
        self._raise_if_dead()
        return await asyncio.get_running_loop().run_in_executor(None, self.engine.add_lora, lora_request)

    async def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter (False if unknown); requests running with it finish with it."""
        if lora_int_id not in self.engine.list_loras():
            return False
        with self._lock:
            self._lora_removals.append(lora_int_id)
        self._wake.set()
        return True

    def list_loras(self) -> set[int]:
        return self.engine.list_loras()

    async def abort(self, request_id: str) -> None:
        self._request_abort(request_id)

    def _request_abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def snapshot(self) -> EngineSnapshot:
        """The engine's requests and KV blocks, plus this wrapper's inbox and open streams."""
        with self._lock:
            inbox = len(self._adds)
        return dataclasses.replace(self.engine.snapshot(), num_inbox=inbox, num_streams=len(self._streams))

    def stats(self) -> EngineStats:
        """Engine counters; requests still in the inbox count as waiting."""
        stats = self.engine.stats()
        stats.num_waiting += len(self._adds)
        return stats

    def cached_block_hash_ids(self) -> list[int]:
        """64-bit ids of the blocks now in the prefix cache (for routing summaries)."""
        cached = self.engine.scheduler.blocks.cached
        for _ in range(5):
            try:
                return [block_hash_id(h) for h in list(cached)]
            except RuntimeError:  # resized by the engine thread mid-copy; try again
                continue
        return []

    def check_health(self) -> None:
        self._raise_if_dead()
        self.engine.workers.check_health()  # a dead worker of an idle replica counts too
        busy = self._busy_since
        if busy is not None and time.monotonic() - max(busy, self._heartbeat) > self.stuck_after_s:
            raise EngineDeadError(f"engine loop made no progress for over {self.stuck_after_s:.0f} s")

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine loop died: {self._dead!r}") from self._dead
        if self._stopped:
            raise EngineDeadError("engine is shut down")

    async def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)
        self.engine.shutdown()

    # -- engine side (background thread) -------------------------------------------
    def _loop(self) -> None:
        eng = self.engine
        try:
            while not self._stopped:
                with self._lock:
                    adds, self._adds = self._adds, []
                    aborts, self._aborts = self._aborts, []
                    removals, self._lora_removals = self._lora_removals, []
                for lora_int_id in removals:  # scheduler state: the engine thread's
                    eng.remove_lora(lora_int_id)
                for group in adds:
                    try:
                        eng.add_group(group)
                    except ValueError as e:
                        self._emit_error(group.request_id, e)
                for rid in aborts:
                    out = eng.abort_request(rid)
                    if out is not None:
                        self._emit(out)
                if not eng.has_unfinished_requests():
                    self._busy_since = None
                    self._heartbeat = time.monotonic()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                if self._busy_since is None:
                    self._busy_since = time.monotonic()
                for out in eng.step():
                    self._emit(out)
                self._heartbeat = time.monotonic()
        except BaseException as e:  # noqa: BLE001 - every in-flight request must hear of it
            self._dead = e
            err = EngineDeadError(f"engine loop died: {e!r}")
            for stream in list(self._streams.values()):
                stream.put(error=err)

    def _emit(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is not None:
            stream.put(out)

    def _emit_error(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(error=error)
