"""What must hold in a replica's engine once no request is in flight ("idle invariants").

After every fault the tests inject (a killed replica, a client gone mid-stream, an
overload burst), once traffic stops each engine must be back to a clean state:

- no request anywhere: none running, none waiting, none in the inbox between the
  event loop and the engine thread, no per-request output state (``groups``), no
  open output stream;
- every KV block back in the pool: ``free`` holds all ``num_blocks`` blocks (the
  unreferenced prefix cache lives in ``free`` too, so "free + cached-unreferenced
  == all" is ``len(free) == num_blocks``), every ``ref_cnt`` is 0, no block table
  left for any request;
- the block manager's structural invariants (``BlockManager.check_invariants``:
  ref counts match owners, the hash map matches the blocks) hold, idle or not.

:func:`engine_invariants` reads the state through the engine's attributes from
outside the engine thread. The engine thread only mutates that state while it
has work, so an idle snapshot is stable; a snapshot taken while requests are in
flight is approximate and reported as "not idle", never as a broken invariant
(the structural check is then skipped: it would race the engine thread).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class InvariantReport:
    """One engine's state against its idle invariants."""

    idle: bool  # no request anywhere in the engine
    ok: bool  # idle and every invariant holds
    violations: list[str] = field(default_factory=list)
    num_blocks: int = 0
    num_free_blocks: int = 0
    num_cached_free_blocks: int = 0  # prefix-cache blocks no request references (in ``free``)
    num_referenced_blocks: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_scheduler_requests: int = 0
    num_output_groups: int = 0
    num_inbox: int = 0
    num_streams: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _llm_engine(engine: Any) -> Any:
    """The synchronous ``LLMEngine`` of an ``AsyncEngine`` (or the engine itself)."""
    inner = getattr(engine, "engine", None)
    return inner if inner is not None and hasattr(inner, "scheduler") else engine


def _count(obj: Any, name: str) -> int:
    value = getattr(obj, name, None)
    return len(value) if value is not None else 0


def engine_invariants(engine: Any) -> InvariantReport:
    """The idle invariants of an ``AsyncEngine`` or ``LLMEngine``; never raises on a broken one."""
    core = _llm_engine(engine)
    sched = core.scheduler
    bm = sched.blocks
    # Copies first: the engine thread may be mutating these while we read (a
    # dict resized mid-copy raises; it settles within a step).
    for attempt in range(5):
        try:
            ref_cnt = list(bm.ref_cnt)
            free = list(bm.free)
            hashes = list(bm.block_hash)
            break
        except RuntimeError:
            if attempt == 4:
                raise
    counts = {
        "num_running": len(sched.running),
        "num_waiting": len(sched.waiting),
        "num_scheduler_requests": len(sched.requests),
        "num_output_groups": _count(core, "groups"),
        # AsyncEngine's inbox and open streams (private there: see the report).
        "num_inbox": _count(engine, "_adds") if engine is not core else 0,
        "num_streams": _count(engine, "_streams") if engine is not core else 0,
    }
    idle = not any(counts.values())
    violations: list[str] = []
    if not idle:
        busy = ", ".join(f"{k}={v}" for k, v in counts.items() if v)
        violations.append(f"not idle: {busy}")
    else:
        held = [b for b, c in enumerate(ref_cnt) if c != 0]
        if held:
            violations.append(f"{len(held)} blocks still referenced with no request in flight: {held[:16]}")
        if len(free) != bm.num_blocks:
            violations.append(f"free pool holds {len(free)} of {bm.num_blocks} blocks")
        tables = {rid: list(t) for rid, t in list(bm.req_blocks.items())}
        if tables:
            violations.append(f"block tables left for {len(tables)} requests: {sorted(tables)[:8]}")
        if getattr(bm, "req_num_hashed", None):
            violations.append(f"hashed-block counters left for {len(bm.req_num_hashed)} requests")
        # The engine's own statement of the same (LLMEngine.idle_invariants),
        # which also runs the block manager's structural checks.
        check = getattr(core, "idle_invariants", None)
        try:
            if check is not None:
                own = check()
                if not own.get("ok", False):
                    violations.append(f"engine idle_invariants: {own}")
            else:
                bm.check_invariants()
        except AssertionError as e:
            violations.append(f"block manager: {e}")
    free_set = set(free)
    return InvariantReport(
        idle=idle,
        ok=idle and not violations,
        violations=violations,
        num_blocks=bm.num_blocks,
        num_free_blocks=len(free),
        num_cached_free_blocks=sum(1 for b in free_set if hashes[b] is not None),
        num_referenced_blocks=sum(1 for c in ref_cnt if c > 0),
        **counts,
    )


__all__ = ["InvariantReport", "engine_invariants"]
