"""Tensor-parallel collectives of CPU ranks on one host, through one shared-memory segment.

gloo's all-reduce goes through TCP on loopback and a wake-up of its
transport thread per message: on a 2-core host, 1.2 ms per all-reduce of a
decode step's activations at TP=2 and 2.9 ms at TP=3, two per layer. Here a
rank writes its tensor into its own slot, publishes a counter and waits for
every rank's counter; then each sums the slots itself, in rank order, so
every rank holds the same bits.

Layout: one 64-byte line per rank holding its counter (u64: the number of
collectives it has entered), then two buffers of ``size`` slots of
``slot_bytes``. Collective number ``seq`` uses buffer ``seq % 2``. A rank
enters collective ``seq + 2`` (and overwrites its slot of that buffer) only
after every rank published ``seq + 1``, which each does only after it
finished reading the slots of ``seq``: two buffers are enough, and one
counter per rank is the only synchronization.

Ordering relies on stores becoming visible in program order (x86's TSO), so
:func:`supported` is true on x86-64 only; elsewhere, and for a tensor larger
than a slot or not contiguous, the caller uses the process group (gloo).
Every wait is bounded by the group's timeout. The segment's name is
removed once every rank has mapped it: nothing is left in ``/dev/shm``
when the processes end, however they end.
"""

from __future__ import annotations

import mmap
import os
import platform
import struct
import time
import uuid

import torch

LINE = 64
SHM_DIR = "/dev/shm"
DEFAULT_SLOT_BYTES = 1 << 20  # a prefill chunk of ~450 tokens of a 576-wide float32 model; larger go to gloo


def supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir(SHM_DIR)


class CollectiveTimeout(RuntimeError):
    """A rank did not enter the collective within the group's timeout."""


class ShmCommunicator:
    def __init__(self, shm: mmap.mmap, rank: int, size: int, slot_bytes: int,
                 timeout_s: float) -> None:
        self.shm, self.rank, self.size, self.slot_bytes = shm, rank, size, slot_bytes
        self.timeout_s = timeout_s
        self._counters = struct.Struct("<" + f"Q{LINE - 8}x" * size)
        self._data = torch.frombuffer(shm, dtype=torch.uint8, offset=size * LINE)
        self.seq = 0
        self.spin_s, self.max_nap_s = 2e-3, 1e-3

    @staticmethod
    def nbytes(size: int, slot_bytes: int) -> int:
        return size * LINE + 2 * size * slot_bytes

    # -- joining -------------------------------------------------------------------
    @classmethod
    def join(cls, store, key: str, rank: int, size: int, timeout_s: float,
             slot_bytes: int = DEFAULT_SLOT_BYTES) -> ShmCommunicator | None:
        """Called by all ``size`` ranks of a group at once: rank 0 makes the segment, the others map
        it. None on every rank when any rank could not (another host, no shared memory)."""
        nbytes = cls.nbytes(size, slot_bytes)
        segment, error = None, ""
        try:
            if rank == 0:
                path = os.path.join(SHM_DIR, f"fleetlm-tp-{uuid.uuid4().hex[:16]}")
                try:
                    segment = _map(path, nbytes, create=True)
                finally:  # the others wait for a path: "" says there is none
                    store.set(f"{key}/path", path if segment is not None else "")
            else:
                path = store.get(f"{key}/path").decode()
                if not path:
                    raise FileNotFoundError("rank 0 made no segment")
                segment = _map(path, nbytes, create=False)
        except Exception as e:  # noqa: BLE001 - any failure here means: use the process group
            error = repr(e)[:200] or "failed"
        store.set(f"{key}/mapped/{rank}", error)
        ok = all(store.get(f"{key}/mapped/{r}") == b"" for r in range(size))
        # Every rank has answered, so every rank that could map it has: its name can go now.
        if rank == 0 and segment is not None:
            os.unlink(path)
        if not ok:
            if segment is not None:
                segment.close()
            return None
        return cls(segment, rank, size, slot_bytes, timeout_s)

    def close(self) -> None:
        self._data = None
        if self.shm is not None:
            try:
                self.shm.close()
            except BufferError:  # a view still points into it; the OS frees it with the process
                pass
            self.shm = None

    # -- collectives ---------------------------------------------------------------
    def fits(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.is_contiguous() and x.numel() * x.element_size() <= self.slot_bytes

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place; every rank gets the same bits (rank order)."""
        slots = self._exchange(x)
        torch.add(slots[0], slots[1], out=x)
        for s in slots[2:]:
            x.add_(s)
        return x

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """Rank ``src``'s ``x`` on every rank (in place)."""
        slots = self._exchange(x, write=self.rank == src)
        if self.rank != src:
            x.copy_(slots[src])
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._exchange(x), dim=-1)

    def _exchange(self, x: torch.Tensor, write: bool = True) -> list[torch.Tensor]:
        """Enter the next collective with ``x`` in this rank's slot; the ranks' slots once all entered."""
        self.seq += 1
        n = x.numel() * x.element_size()
        base = (self.seq & 1) * self.size * self.slot_bytes
        slots = [self._data[base + r * self.slot_bytes: base + r * self.slot_bytes + n].view(x.dtype).view(x.shape)
                 for r in range(self.size)]
        if write:
            slots[self.rank].copy_(x)
        struct.pack_into("<Q", self.shm, self.rank * LINE, self.seq)  # publish after the data
        self._wait_all(self.seq)
        return slots

    def _wait_all(self, seq: int) -> None:
        if min(self._counters.unpack_from(self.shm)) >= seq:
            return
        start = time.monotonic()
        deadline = start + self.timeout_s
        nap = 20e-6
        while True:
            counters = self._counters.unpack_from(self.shm)
            if min(counters) >= seq:
                return
            now = time.monotonic()
            if now > deadline:
                late = [r for r, c in enumerate(counters) if c < seq]
                raise CollectiveTimeout(f"tensor-parallel collective {seq}: rank(s) {late} did not arrive "
                                        f"within {self.timeout_s:g} s")
            if now - start < self.spin_s:
                os.sched_yield()  # the other ranks may need this core to get here
            else:
                time.sleep(nap)
                nap = min(nap * 2, self.max_nap_s)


def _map(path: str, nbytes: int, create: bool) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        if create:
            os.ftruncate(fd, nbytes)
        elif os.fstat(fd).st_size != nbytes:
            raise ValueError(f"{path} has {os.fstat(fd).st_size} bytes, not {nbytes}")
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
