"""What an engine reports of itself: counters for metrics (``EngineStats``), and a copy of
its request and KV-block state read from outside the engine thread (``EngineSnapshot``).

``LLMEngine.snapshot()`` / ``AsyncEngine.snapshot()`` return one; the idle
invariants (``LLMEngine.idle_invariants``, ``cluster/invariants.py``) are
judged on it, so nothing outside the engine reads its private fields. The
engine thread only mutates this state while it has work: an idle snapshot is
exact; a busy one is approximate (and then the block manager's structural
check is skipped, it would race the engine thread).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_preemptions: int
    # Multi-LoRA: adapters in the device slots now, and slot loads / evictions so far.
    lora_resident: tuple[str, ...] = ()
    lora_resident_ids: tuple[int, ...] = ()
    lora_known_ids: tuple[int, ...] = ()  # checked and read into the workers' host memory
    lora_loads: int = 0
    lora_evictions: int = 0

    @property
    def num_lora_resident(self) -> int:
        return len(self.lora_resident)


@dataclass(frozen=True)
class EngineSnapshot:
    # Requests, wherever they are.
    num_running: int
    num_waiting: int
    num_scheduler_requests: int
    num_output_groups: int  # per-request output state (n children, detokenizers)
    num_inbox: int  # AsyncEngine: added by the event loop, not yet taken by the engine thread
    num_streams: int  # AsyncEngine: open output streams
    num_steps_in_flight: int
    # KV blocks.
    num_blocks: int
    num_free_blocks: int  # in the pool, the unreferenced prefix cache included
    num_cached_free_blocks: int  # of those, blocks still holding a cached prefix
    referenced_blocks: tuple[int, ...]  # ids with ref_cnt > 0
    block_tables: tuple[str, ...]  # request ids that still own a block table
    num_hashed_counters: int  # requests with a "blocks already hashed" counter
    structure_error: str | None  # BlockManager.check_invariants' complaint (idle snapshots only)
    num_lora_pins: int = 0  # device LoRA slots held by running requests (engine/lora_slots.py)

    @property
    def busy_counts(self) -> dict[str, int]:
        """The request counters that are not zero (an idle engine has none)."""
        counts = {"num_running": self.num_running, "num_waiting": self.num_waiting,
                  "num_scheduler_requests": self.num_scheduler_requests,
                  "num_output_groups": self.num_output_groups, "num_inbox": self.num_inbox,
                  "num_streams": self.num_streams, "num_steps_in_flight": self.num_steps_in_flight}
        return {k: v for k, v in counts.items() if v}

    @property
    def idle(self) -> bool:
        return not self.busy_counts

    @classmethod
    def take(cls, scheduler, *, num_output_groups: int = 0, num_inbox: int = 0, num_streams: int = 0,
             num_steps_in_flight: int = 0) -> EngineSnapshot:
        """Copy ``scheduler``'s state; retried while the engine thread resizes a dict under us."""
        bm = scheduler.blocks
        for attempt in range(5):
            try:
                ref_cnt = list(bm.ref_cnt)
                free = list(bm.free)
                hashes = list(bm.block_hash)
                tables = tuple(sorted(bm.req_blocks))
                hashed = len(bm.req_num_hashed)
                running, waiting, requests = len(scheduler.running), len(scheduler.waiting), len(scheduler.requests)
                pins = sum(scheduler.loras.pins) if scheduler.loras is not None else 0
                break
            except RuntimeError:  # "dictionary changed size during iteration": it settles within a step
                if attempt == 4:
                    raise
        snap = cls(
            num_running=running, num_waiting=waiting, num_scheduler_requests=requests,
            num_output_groups=num_output_groups, num_inbox=num_inbox, num_streams=num_streams,
            num_steps_in_flight=num_steps_in_flight, num_blocks=bm.num_blocks, num_free_blocks=len(free),
            num_cached_free_blocks=sum(1 for b in set(free) if hashes[b] is not None),
            referenced_blocks=tuple(b for b, c in enumerate(ref_cnt) if c > 0), block_tables=tables,
            num_hashed_counters=hashed, structure_error=None, num_lora_pins=pins,
        )
        if not snap.idle:
            return snap
        try:
            bm.check_invariants()
        except AssertionError as e:
            return dataclasses.replace(snap, structure_error=str(e))
        return snap

    def idle_report(self) -> dict:
        """What must hold once no request is in flight (asserted by tests after faults).

        Every block is free or cached-unreferenced (none referenced), nothing
        runs or waits, no step is in flight, and the block manager's
        structural invariants hold.
        """
        violations = self.violations()
        return {
            "num_blocks": self.num_blocks,
            "free_blocks": self.num_free_blocks - self.num_cached_free_blocks,
            "cached_unreferenced_blocks": self.num_cached_free_blocks,
            "referenced_blocks": len(self.referenced_blocks),
            "running": self.num_running,
            "waiting": self.num_waiting,
            "open_requests": self.num_output_groups,
            "steps_in_flight": self.num_steps_in_flight,
            "violations": violations,
            "ok": not violations,
        }

    def violations(self) -> list[str]:
        """What is wrong with this state as an idle engine's (``["not idle: ..."]`` if busy)."""
        if not self.idle:
            return ["not idle: " + ", ".join(f"{k}={v}" for k, v in self.busy_counts.items())]
        out = []
        if self.referenced_blocks:
            out.append(f"{len(self.referenced_blocks)} blocks still referenced with no request in flight: "
                       f"{list(self.referenced_blocks[:16])}")
        if self.num_free_blocks != self.num_blocks:
            out.append(f"free pool holds {self.num_free_blocks} of {self.num_blocks} blocks")
        if self.block_tables:
            out.append(f"block tables left for {len(self.block_tables)} requests: {list(self.block_tables[:8])}")
        if self.num_hashed_counters:
            out.append(f"hashed-block counters left for {self.num_hashed_counters} requests")
        if self.structure_error is not None:
            out.append(f"block manager: {self.structure_error}")
        if self.num_lora_pins:
            out.append(f"{self.num_lora_pins} LoRA slot pins left with no request running")
        return out

