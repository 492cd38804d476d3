"""The shared-memory step ring and the step codec: exact bytes, order, chunking, bounds."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import time

import pytest

from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.engine.step import NewRequest, ScheduledRequest, SchedulerOutput
from fleetlm.workers.shm_ring import RingClosed, RingTimeout, ShmRing
from fleetlm.workers.step_codec import StepDecoder, StepEncoder


@pytest.fixture
def ring():
    r = ShmRing.create(num_readers=2, num_slots=3, slot_bytes=256)
    yield r
    r.close()


def _soon(s: float = 5.0) -> float:
    return time.monotonic() + s


def test_every_reader_gets_every_message_in_order(ring):
    readers = [ShmRing.attach(ring.handle, r) for r in range(2)]
    msgs = [bytes([i]) * (i * 37 % 200 + 1) for i in range(3)]
    for m in msgs:
        ring.write(m, _soon())
    for rd in readers:
        assert [rd.read(_soon()) for _ in msgs] == msgs
        rd.close()


def test_a_message_larger_than_a_slot_spans_slots(ring):
    reader0, reader1 = (ShmRing.attach(ring.handle, r) for r in range(2))
    big = bytes(range(256)) * 2  # 512 bytes over slots of 256 - header
    ring.write(big, _soon())
    assert reader0.read(_soon()) == big
    assert reader1.read(_soon()) == big
    # Slots wrap around after a chunked message.
    for i in range(5):
        ring.write(b"x%d" % i, _soon())
        assert reader0.read(_soon()) == b"x%d" % i
        assert reader1.read(_soon()) == b"x%d" % i


def test_writer_waits_for_the_slowest_reader_and_times_out(ring):
    fast = ShmRing.attach(ring.handle, 0)
    for i in range(3):  # fills every slot; reader 1 reads nothing
        ring.write(b"%d" % i, _soon())
        assert fast.read(_soon()) == b"%d" % i
    t0 = time.monotonic()
    with pytest.raises(RingTimeout):
        ring.write(b"no room", time.monotonic() + 0.2)
    assert 0.15 < time.monotonic() - t0 < 2.0


def test_reader_times_out_and_can_be_cancelled(ring):
    reader = ShmRing.attach(ring.handle, 1)
    with pytest.raises(RingTimeout):
        reader.read(time.monotonic() + 0.1)
    reader.check_every_s = 0.0
    with pytest.raises(RingClosed):
        reader.read(_soon(), cancelled=lambda: True)


def _echo(handle_in, handle_out, n):
    inbox = ShmRing.attach(handle_in, 0)
    outbox = ShmRing.attach(handle_out, None)
    for _ in range(n):
        msg = inbox.read(time.monotonic() + 30)
        outbox.write(msg[::-1], time.monotonic() + 30)
    inbox.close()
    outbox.close()


def test_the_owner_forgets_the_name_once_the_readers_mapped_it(ring):
    import os

    readers = [ShmRing.attach(ring.handle, r) for r in range(2)]
    path = os.path.join("/dev/shm", ring.shm.name)
    assert os.path.exists(path)
    ring.forget_name()  # nothing of it stays in /dev/shm should this process be killed now
    assert not os.path.exists(path) and not ring.named
    for i in range(4):  # the mapping works on: the slots wrap around
        ring.write(b"m%d" % i, _soon())
        assert [rd.read(_soon()) for rd in readers] == [b"m%d" % i] * 2
    for rd in readers:
        rd.close()
    ring.close()  # no name left to remove: no error


def test_between_processes():
    to_child = ShmRing.create(num_readers=1, num_slots=2, slot_bytes=4096)
    from_child = ShmRing.create(num_readers=1, num_slots=2, slot_bytes=4096, reader=0)
    proc = mp.get_context("spawn").Process(target=_echo, args=(to_child.handle, from_child.handle, 20))
    proc.start()
    try:
        for i in range(20):
            msg = pickle.dumps(list(range(i * 50)))  # up to ~5 kB: some span two slots
            to_child.write(msg, _soon(30))
            assert from_child.read(_soon(30)) == msg[::-1]
    finally:
        proc.join(timeout=30)
        to_child.close()
        from_child.close()
    assert proc.exitcode == 0


def _step(step_id, rows, new=(), finished=(), preempted=()):
    return SchedulerOutput([ScheduledRequest(rid, toks, start, table, True) for rid, toks, start, table in rows],
                           list(new), list(finished), list(preempted), step_id)


def test_codec_rebuilds_each_step_and_sends_only_new_blocks():
    enc, dec = StepEncoder(), StepDecoder()
    new = NewRequest("a", [1, 2, 3], SamplingParams(max_tokens=4))
    steps = [
        _step(0, [("a", [1, 2, 3], 0, [7])], new=[new]),
        _step(1, [("a", [5], 3, [7])]),
        _step(2, [("a", [6], 4, [7, 9]), ("b", [4, 4], 0, [3])]),
        _step(3, [("a", [1], 5, [7, 9])], finished=["b"]),
        _step(4, [("a", [2], 0, [4])], preempted=["a"]),  # rebuilt after preemption
        _step(5, [("a", [3], 1, [4, 8, 6])]),
        _step(6, [("a", [2], 2, [4, 5])]),  # trimmed, then a different block
    ]
    sizes = []
    for out in steps:
        payload = enc.encode(out)
        sizes.append(len(payload))
        assert dec.decode(payload) == out
    _, rows, *_ = pickle.loads(enc.encode(_step(7, [("a", [9], 3, [4, 5])])))
    assert rows[0][3:5] == (2, [])  # keep both held blocks, send none


def test_codec_payload_does_not_grow_with_context():
    enc = StepEncoder()
    tables = [list(range(128 * i, 128 * (i + 1))) for i in range(64)]  # 2,048 tokens of context each
    enc.encode(_step(0, [(f"r{i}", [1], 2047, tables[i]) for i in range(64)]))
    step = _step(1, [(f"r{i}", [1], 2048, list(tables[i])) for i in range(64)])
    steady, full = enc.encode(step), pickle.dumps(step)
    assert len(steady) < len(full) / 10, (len(steady), len(full))


def test_codec_carries_grammar_bitmasks_and_late_grammars():
    import dataclasses

    import torch

    from fleetlm.engine.step import GrammarBitmask
    from fleetlm.workers.step_codec import LateGrammar

    enc, dec = StepEncoder(), StepDecoder()
    mask = torch.tensor([[5, -1], [0, 7]], dtype=torch.int32)
    out = dataclasses.replace(_step(0, [("a", [1], 0, [7])]), grammar=GrammarBitmask(["a"], mask))
    got = dec.decode(enc.encode(out))
    assert got.grammar.request_ids == ["a"] and torch.equal(got.grammar.bitmask, mask) and not got.grammar_later
    later = dec.decode(enc.encode(dataclasses.replace(out, grammar=None, grammar_later=True)))
    assert later.grammar is None and later.grammar_later
    late = dec.decode(enc.encode_grammar(0, GrammarBitmask(["a"], mask)))
    assert isinstance(late, LateGrammar) and late.step_id == 0 and torch.equal(late.grammar.bitmask, mask)
    assert dec.decode(enc.encode_grammar(1, None)) == LateGrammar(1, None)
