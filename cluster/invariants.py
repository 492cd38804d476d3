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

:func:`engine_invariants` judges the engine's public snapshot
(``engine.snapshot()``, ``engine/snapshot.py``), taken from outside the
engine thread: exact when idle; a snapshot taken while requests are in
flight is approximate and reported as "not idle", never as a broken
invariant.
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


def engine_invariants(engine: Any) -> InvariantReport:
    """The idle invariants of an ``AsyncEngine`` or ``LLMEngine`` (anything with ``snapshot()``)."""
    snap = engine.snapshot()
    violations = snap.violations()
    return InvariantReport(
        idle=snap.idle,
        ok=not violations,
        violations=violations,
        num_blocks=snap.num_blocks,
        num_free_blocks=snap.num_free_blocks,
        num_cached_free_blocks=snap.num_cached_free_blocks,
        num_referenced_blocks=len(snap.referenced_blocks),
        num_running=snap.num_running,
        num_waiting=snap.num_waiting,
        num_scheduler_requests=snap.num_scheduler_requests,
        num_output_groups=snap.num_output_groups,
        num_inbox=snap.num_inbox,
        num_streams=snap.num_streams,
    )


__all__ = ["InvariantReport", "engine_invariants"]
