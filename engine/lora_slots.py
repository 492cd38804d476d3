"""Which adapter sits in which of the ``max_loras`` device slots: the scheduler's side of multi-LoRA.

The workers hold ``max_loras`` fixed slots of LoRA weights (fixed, so CUDA
graphs stay valid); this module is the only owner of their placement, as
the block manager is of KV blocks. A running request *pins* its adapter's
slot from admission until it finishes or is preempted, so the adapters of
the running batch (and of every step) never exceed the slots. A request
whose adapter is not resident takes a free slot, else evicts the least
recently used unpinned one; the step that first runs it carries the load
(``SchedulerOutput.lora_loads``: slot -> adapter), which the workers apply,
in stream order, before its forward.

Fairness: requests of a resident adapter join its slot without waiting, so
a steady stream of them could keep every slot pinned forever. Once a
request has waited ``SLOT_WAIT_STEPS`` scheduler steps for a slot, no
request may add a pin (base-model requests still run): slots drain as their
requests finish, and the oldest request that needs a slot gets the first
one that empties (admission is first-come first-served).

Plain Python over ints, no torch.
"""

from __future__ import annotations

from collections import OrderedDict

from fleetlm.engine.step import LoRAAdapter

# Steps a request may wait for a slot before resident adapters stop admitting.
SLOT_WAIT_STEPS = 64


class LoRASlots:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"max_loras must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self.adapter: list[LoRAAdapter | None] = [None] * num_slots
        self.pins = [0] * num_slots
        self.slot_of: dict[int, int] = {}  # lora_int_id -> slot
        # Resident slots nobody pins, least recently unpinned first (eviction order).
        self.idle: OrderedDict[int, None] = OrderedDict()
        self.free = list(range(num_slots - 1, -1, -1))  # never used (or retired) slots; pop() takes the lowest
        self.retired: set[int] = set()  # adapters removed while pinned: their slot empties when unpinned
        self.loads: dict[int, LoRAAdapter] = {}  # slot -> adapter to load, since the last step
        self.num_loads = 0
        self.num_evictions = 0
        # Fairness: request id -> scheduler step at which it first found no slot (oldest first).
        self.step = 0
        self.waiters: dict[str, int] = {}

    # -- the scheduler's calls ----------------------------------------------------
    def begin_step(self) -> None:
        self.step += 1

    @property
    def draining(self) -> bool:
        """A request has waited too long for a slot: no new pins until it gets one."""
        first = next(iter(self.waiters.values()), None)
        return first is not None and self.step - first >= SLOT_WAIT_STEPS

    def can_acquire(self, request_id: str, lora: LoRAAdapter | None) -> bool:
        """Whether a request of ``lora`` may be admitted now (a base request always may).

        A request that needs a slot and finds none starts waiting for one (see ``draining``).
        """
        if lora is None:
            return True
        slot = self.slot_of.get(lora.lora_int_id)
        if slot is not None and self.pins[slot]:
            return not self.draining
        if slot is not None or self.free or self.idle:
            return True
        self.waiters.setdefault(request_id, self.step)
        return False

    def forget(self, request_id: str) -> None:
        """The request left the queue without a slot (aborted) or got one."""
        self.waiters.pop(request_id, None)

    def acquire(self, request_id: str, lora: LoRAAdapter | None) -> int:
        """Pin ``lora``'s slot for a request admitted now (placing it first if needed); -1 for the base model."""
        self.waiters.pop(request_id, None)
        if lora is None:
            return -1
        slot = self.slot_of.get(lora.lora_int_id)
        if slot is None:
            slot = self._place(lora)
        elif not self.pins[slot]:
            del self.idle[slot]
        self.pins[slot] += 1
        return slot

    def release(self, lora: LoRAAdapter | None) -> None:
        """A request of ``lora`` left the running batch (finished or preempted)."""
        if lora is None:
            return
        slot = self.slot_of[lora.lora_int_id]
        self.pins[slot] -= 1
        assert self.pins[slot] >= 0, f"slot {slot} unpinned more often than pinned"
        if self.pins[slot]:
            return
        if lora.lora_int_id in self.retired:
            self._empty(slot)
        else:
            self.idle[slot] = None

    def retire(self, lora_int_id: int) -> None:
        """The adapter was removed: free its slot now, or when its last running request leaves it."""
        slot = self.slot_of.get(lora_int_id)
        if slot is None:
            return
        if self.pins[slot]:
            self.retired.add(lora_int_id)
        else:
            del self.idle[slot]
            self._empty(slot)

    def take_loads(self) -> dict[int, LoRAAdapter]:
        loads, self.loads = self.loads, {}
        return loads

    def slot(self, lora: LoRAAdapter | None) -> int:
        return -1 if lora is None else self.slot_of[lora.lora_int_id]

    @property
    def resident(self) -> list[LoRAAdapter]:
        return [a for a in self.adapter if a is not None]

    def check_invariants(self) -> None:
        for slot, lora in enumerate(self.adapter):
            if lora is None:
                assert slot in self.free and not self.pins[slot] and slot not in self.idle, slot
            else:
                assert self.slot_of[lora.lora_int_id] == slot and slot not in self.free, slot
                assert (slot in self.idle) == (self.pins[slot] == 0), slot
        assert len(self.slot_of) == sum(a is not None for a in self.adapter)

    # -- internals ------------------------------------------------------------------
    def _place(self, lora: LoRAAdapter) -> int:
        if self.free:
            slot = self.free.pop()
        else:
            slot, _ = self.idle.popitem(last=False)
            del self.slot_of[self.adapter[slot].lora_int_id]
            self.num_evictions += 1
        self.adapter[slot] = lora
        self.slot_of[lora.lora_int_id] = slot
        self.loads[slot] = lora
        self.num_loads += 1
        return slot

    def _empty(self, slot: int) -> None:
        lora = self.adapter[slot]
        self.retired.discard(lora.lora_int_id)
        del self.slot_of[lora.lora_int_id]
        self.adapter[slot] = None
        self.loads.pop(slot, None)
        self.free.append(slot)
        self.free.sort(reverse=True)
