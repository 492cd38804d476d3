"""A message ring in shared memory: one writer, a fixed set of readers, one node.

The engine broadcasts each step to the workers on its node through one ring
(every worker reads every message), and the worker that samples hands each
step's result back through another (one reader). A message costs a pickle,
a memory copy and a flag flip: no Ray task, no object store, no socket.

Layout: ``num_slots`` slots of ``slot_bytes``. A slot starts with a header,
``seq`` (u64), ``nbytes`` (u64), ``more`` (u8: the message goes on in the
next slot) and one ``done`` byte per reader, then its payload. Message
chunk ``m`` (counting every slot ever written) lives in slot ``m %
num_slots``:

- the writer waits until every reader has set its ``done`` byte of that slot
  (chunk ``m - num_slots`` was read by all), writes payload, ``nbytes`` and
  ``more``, clears the ``done`` bytes, and publishes by writing ``seq = m + 1``
  last;
- reader ``r`` waiting for chunk ``m`` polls the slot's ``seq`` until it is
  ``m + 1``, copies the payload out, and sets its ``done`` byte.

Ordering relies on stores becoming visible in program order (x86's TSO, the
GPU hosts'); the header's fields are each written by one side only.

Waiting: a reader between steps polls with ``sched_yield`` (which releases the
GIL, so the process' other threads run) for ``spin_s``, then sleeps in short
naps that grow to ``max_nap_s``: a step arriving while it spins is seen in
microseconds; an idle worker costs almost no CPU. Every wait is bounded by a
deadline and may be interrupted by ``cancelled()``, asked every ``check_every_s``.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from multiprocessing import shared_memory

_HEADER = struct.Struct("<QQB")  # seq, nbytes, more


class RingTimeout(TimeoutError):
    """A wait on the ring passed its deadline."""


class RingClosed(RuntimeError):
    """The wait was cancelled (the other side is gone or the ring is shut down)."""


def _unregister(name: str) -> None:
    # A process that only attaches must not make Python's resource tracker
    # unlink the segment when it exits: the creator owns it.
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(name, "shared_memory")
    except Exception:  # noqa: BLE001 - tracker internals differ between versions
        pass


class ShmRing:
    def __init__(self, shm: shared_memory.SharedMemory, num_slots: int, slot_bytes: int, num_readers: int,
                 owner: bool, reader: int | None) -> None:
        self.shm, self.buf = shm, shm.buf
        self.num_slots, self.slot_bytes, self.num_readers = num_slots, slot_bytes, num_readers
        self.header_bytes = -(-(_HEADER.size + num_readers) // 64) * 64
        self.capacity = slot_bytes - self.header_bytes
        if self.capacity <= 0:
            raise ValueError(f"slot_bytes ({slot_bytes}) leaves no room for a payload")
        self.owner, self.reader = owner, reader
        self.named = True  # the segment's name is in /dev/shm (the owner removes it: forget_name)
        self.next_chunk = 0  # writer: the next chunk to write; reader: the next to read
        self.spin_s, self.max_nap_s = 2e-3, 1e-3
        self.check_every_s = 0.02  # how often a long wait asks ``cancelled()``

    # -- lifecycle -------------------------------------------------------------
    @classmethod
    def create(cls, num_readers: int, num_slots: int = 8, slot_bytes: int = 1 << 20,
               reader: int | None = None) -> ShmRing:
        """A new ring, owned by this process, which is its writer (``reader`` None) or that reader."""
        if num_readers < 1 or num_slots < 2:
            raise ValueError("a ring needs at least one reader and two slots")
        shm = shared_memory.SharedMemory(create=True, size=num_slots * slot_bytes)
        ring = cls(shm, num_slots, slot_bytes, num_readers, owner=True, reader=reader)
        for s in range(num_slots):  # every slot starts out read by everyone
            base = s * slot_bytes
            ring.buf[base: base + _HEADER.size] = _HEADER.pack(0, 0, 0)
            ring.buf[base + _HEADER.size: base + _HEADER.size + num_readers] = b"\x01" * num_readers
        return ring

    @property
    def handle(self) -> tuple[str, int, int, int]:
        """What a reader in another process needs to attach (picklable)."""
        return self.shm.name, self.num_slots, self.slot_bytes, self.num_readers

    @classmethod
    def attach(cls, handle: tuple[str, int, int, int], reader: int | None) -> ShmRing:
        """Open the ring made by another process, as reader ``reader`` (None: as its writer)."""
        name, num_slots, slot_bytes, num_readers = handle
        if reader is not None and not 0 <= reader < num_readers:
            raise ValueError(f"reader {reader} of a ring with {num_readers} readers")
        shm = shared_memory.SharedMemory(name=name)
        _unregister(shm._name)  # noqa: SLF001 - the name as the tracker registered it
        return cls(shm, num_slots, slot_bytes, num_readers, owner=False, reader=reader)

    def forget_name(self) -> None:
        """The owner removes the segment's name once every other end has mapped it: the memory then
        goes with the last process that maps it, however the processes end (a SIGKILL too)."""
        if self.owner and self.named and self.shm is not None:
            self.named = False
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Detach; the creator also removes the segment (if its name is still there). Idempotent."""
        if self.shm is None:
            return
        self.buf = None
        try:
            self.shm.close()
        except BufferError:  # a memoryview still points into it; the OS frees it at exit
            pass
        if self.owner and self.named:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass
        self.shm = None

    # -- messages ----------------------------------------------------------------
    def write(self, payload: bytes, deadline: float, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Publish one message (split over as many slots as it needs)."""
        view = memoryview(payload)
        while True:
            chunk, view = view[: self.capacity], view[self.capacity:]
            base = self._slot(self.next_chunk)
            done = slice(base + _HEADER.size, base + _HEADER.size + self.num_readers)
            self._wait(lambda: all(self.buf[done]), deadline, cancelled, "the readers to take an earlier message")
            start = base + self.header_bytes
            self.buf[start: start + len(chunk)] = chunk
            self.buf[done] = bytes(self.num_readers)
            struct.pack_into("<QB", self.buf, base + 8, len(chunk), 1 if len(view) else 0)
            struct.pack_into("<Q", self.buf, base, self.next_chunk + 1)  # publish last
            self.next_chunk += 1
            if not len(view):
                return

    def read(self, deadline: float, cancelled: Callable[[], bool] = lambda: False) -> bytes:
        """The next message for this reader; waits until it is published or the deadline passes."""
        if self.reader is None:
            raise RuntimeError("this end of the ring writes; it cannot read")
        parts = []
        while True:
            base = self._slot(self.next_chunk)
            want = self.next_chunk + 1
            self._wait(lambda: struct.unpack_from("<Q", self.buf, base)[0] == want, deadline, cancelled,
                       "the next message")
            _, nbytes, more = _HEADER.unpack_from(self.buf, base)
            start = base + self.header_bytes
            parts.append(bytes(self.buf[start: start + nbytes]))
            self.buf[base + _HEADER.size + self.reader] = 1
            self.next_chunk += 1
            if not more:
                return parts[0] if len(parts) == 1 else b"".join(parts)

    def _slot(self, chunk: int) -> int:
        return (chunk % self.num_slots) * self.slot_bytes

    def _wait(self, ready: Callable[[], bool], deadline: float, cancelled: Callable[[], bool], what: str) -> None:
        if ready():
            return
        start = checked = time.monotonic()
        nap = 20e-6
        while not ready():
            now = time.monotonic()
            if now > deadline:
                raise RingTimeout(f"timed out waiting for {what}")
            if now - checked > self.check_every_s:
                checked = now
                if cancelled():
                    raise RingClosed(f"cancelled while waiting for {what}")
            if now - start < self.spin_s:
                os.sched_yield()
            else:
                time.sleep(nap)
                nap = min(nap * 2, self.max_nap_s)
