"""A step as bytes for remote workers: block tables sent as what changed.

A ``SchedulerOutput`` carries each scheduled request's whole block table,
every step: at 256 requests of 2,048 tokens that is 32k block ids a step,
almost all of them sent before. Workers keep each request's table between
steps (they already keep its prompt and sampling parameters), so the
encoder sends per request only ``keep`` (how many of the blocks the workers
hold are still the table's first ones) and the blocks after them: one new
block every ``block_size`` decode steps, nothing otherwise. A table only
shrinks when rejected proposals give blocks back, and starts over when the
request is preempted (the workers drop it then, as when it finishes).

The decoder rebuilds the exact ``SchedulerOutput`` the engine made, so the
runner and the step contract (``engine/step.py``) are unchanged by the
transport. A step's grammar bitmask (structured output) travels as an int32
array; one sent ``grammar_later`` gets it in a message of its own
(``LateGrammar``), which the engine writes right after the step it sampled
from is processed, before the next step.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import torch

from fleetlm.engine.step import GrammarBitmask, ScheduledRequest, SchedulerOutput

STOP = b"stop"  # tells a worker's loop to return


@dataclass(frozen=True)
class LateGrammar:
    """The bitmask of step ``step_id``, launched with ``grammar_later``."""

    step_id: int
    grammar: GrammarBitmask | None


def _pack(g: GrammarBitmask | None):
    return None if g is None else (g.request_ids, g.bitmask.numpy())


def _unpack(packed) -> GrammarBitmask | None:
    return None if packed is None else GrammarBitmask(packed[0], torch.from_numpy(packed[1]))


class StepEncoder:
    """Engine side: one per worker group (its workers' view of the tables)."""

    def __init__(self) -> None:
        self._sent: dict[str, list[int]] = {}  # request id -> the table the workers hold

    def encode(self, out: SchedulerOutput) -> bytes:
        for rid in out.finished_request_ids:
            self._sent.pop(rid, None)
        for rid in out.preempted_request_ids:
            self._sent.pop(rid, None)
        rows = []
        for s in out.scheduled:
            table = s.block_table
            held = self._sent.get(s.request_id, [])
            keep = min(len(held), len(table))
            if table[:keep] != held[:keep]:
                keep = next(i for i, (a, b) in enumerate(zip(table, held)) if a != b)
            self._sent[s.request_id] = table
            rows.append((s.request_id, s.token_ids, s.start_pos, keep, table[keep:], s.sample, s.num_spec_tokens))
        msg = (out.step_id, rows, out.new_requests, out.finished_request_ids, out.preempted_request_ids,
               _pack(out.grammar), out.grammar_later, out.lora_loads)
        return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def encode_grammar(step_id: int, grammar: GrammarBitmask | None) -> bytes:
        return pickle.dumps(("grammar", step_id, _pack(grammar)), protocol=pickle.HIGHEST_PROTOCOL)


class StepDecoder:
    """Worker side: the tables as the encoder last sent them."""

    def __init__(self) -> None:
        self._tables: dict[str, list[int]] = {}

    def decode(self, payload: bytes) -> SchedulerOutput | LateGrammar:
        msg = pickle.loads(payload)
        if msg[0] == "grammar":  # a step message starts with its (int) step id
            return LateGrammar(msg[1], _unpack(msg[2]))
        step_id, rows, new_requests, finished, preempted, grammar, grammar_later, lora_loads = msg
        for rid in finished:
            self._tables.pop(rid, None)
        for rid in preempted:
            self._tables.pop(rid, None)
        scheduled = []
        for rid, token_ids, start_pos, keep, new_blocks, sample, num_spec in rows:
            table = self._tables.setdefault(rid, [])
            del table[keep:]
            table.extend(new_blocks)
            scheduled.append(ScheduledRequest(rid, token_ids, start_pos, list(table), sample, num_spec))
        return SchedulerOutput(scheduled, new_requests, finished, preempted, step_id, grammar=_unpack(grammar),
                               grammar_later=grammar_later, lora_loads=lora_loads)
