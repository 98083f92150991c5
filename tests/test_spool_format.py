"""The spool record format, sans-IO: encode, decode and scan bytes without any file."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgegw.spool.format import (
    HEADER_SIZE,
    MAGIC,
    Damage,
    Kind,
    Record,
    Scanner,
    decode,
    encode_ack,
    encode_commit,
    encode_frame,
    encode_state,
    scan,
)


def frames(n: int, size: int = 100) -> list[bytes]:
    return [encode_frame(s, bytes([s % 251]) * size, s, {"src": s}) for s in range(1, n + 1)]


def test_frame_round_trip_keeps_seq_body_records_and_checkpoints() -> None:
    raw = encode_frame(42, b"body bytes", 7, {"stdf-1": {"offset": 1234}})
    rec = decode(raw)
    assert rec.kind is Kind.FRAME
    assert rec.seq == 42
    assert rec.body == b"body bytes"
    assert rec.meta_value() == {"n": 7, "c": {"stdf-1": {"offset": 1234}}}
    assert rec.size == len(raw)
    assert raw.startswith(MAGIC)


def test_other_record_kinds_round_trip() -> None:
    assert decode(encode_commit(9)).kind is Kind.COMMIT
    assert decode(encode_commit(9)).seq == 9
    ack = decode(encode_ack(10, [(12, 14)], 3))
    assert (ack.kind, ack.seq, ack.meta_value()) == (Kind.ACK, 10, {"r": [[12, 14]], "d": 3})
    state = decode(encode_state({"epoch": "e", "next_seq": 5}))
    assert state.kind is Kind.STATE and state.meta_value()["next_seq"] == 5


@pytest.mark.parametrize("damage", ["flip_body", "flip_header", "cut"])
def test_decode_refuses_damaged_records(damage: str) -> None:
    raw = bytearray(encode_frame(1, b"x" * 50, 1, {}))
    if damage == "flip_body":
        raw[-3] ^= 0x40
    elif damage == "flip_header":
        raw[9] ^= 0x01
    else:
        raw = raw[:-1]
    with pytest.raises(ValueError):
        decode(bytes(raw))


def test_scan_of_clean_stream_yields_every_record_in_order() -> None:
    data = b"".join(frames(20)) + encode_commit(20)
    events = scan(data)
    assert all(isinstance(e, Record) for e in events)
    assert [e.seq for e in events if e.kind is Kind.FRAME] == list(range(1, 21))
    assert events[-1].kind is Kind.COMMIT


def test_flipped_body_byte_is_reported_with_the_frame_seq_and_the_rest_survives() -> None:
    recs = frames(5)
    data = bytearray(b"".join(recs))
    third = sum(len(r) for r in recs[:2])
    data[third + HEADER_SIZE + 20] ^= 0xFF
    events = scan(bytes(data))
    damaged = [e for e in events if isinstance(e, Damage)]
    assert len(damaged) == 1
    assert damaged[0].seq == 3 and not damaged[0].truncated
    assert [e.seq for e in events if isinstance(e, Record)] == [1, 2, 4, 5]


def test_flipped_header_byte_resynchronises_on_the_next_record() -> None:
    recs = frames(5)
    data = bytearray(b"".join(recs))
    second = len(recs[0])
    data[second + 17] ^= 0x01  # inside meta_len
    events = scan(bytes(data))
    damaged = [e for e in events if isinstance(e, Damage)]
    assert len(damaged) == 1 and damaged[0].seq is None
    assert damaged[0].offset == second and damaged[0].size == len(recs[1])
    assert [e.seq for e in events if isinstance(e, Record)] == [1, 3, 4, 5]


def test_torn_tail_is_reported_as_truncated_damage() -> None:
    recs = frames(3)
    data = b"".join(recs)[:-10]
    events = scan(data)
    assert [e.seq for e in events if isinstance(e, Record)] == [1, 2]
    (tail,) = [e for e in events if isinstance(e, Damage)]
    assert tail.truncated and tail.seq == 3
    assert tail.offset + tail.size == len(data)


def test_garbage_without_magic_does_not_accumulate_in_the_scanner() -> None:
    s = Scanner()
    for _ in range(100):
        s.feed(b"\x00" * 10_000)
        for ev in s.events():
            assert isinstance(ev, Damage)
    assert len(s._buf) - s._start < 10_000  # bounded: at most one chunk is held
    s.feed(encode_frame(1, b"ok", 1, {}))
    s.end()
    assert [e.seq for e in s.events() if isinstance(e, Record)] == [1]


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=5000), max_size=12),
       sizes=st.lists(st.integers(min_value=0, max_value=700), min_size=1, max_size=12))
def test_any_chunking_gives_the_same_events(cuts: list[int], sizes: list[int]) -> None:
    data = b"".join(encode_frame(i + 1, b"y" * n, 1, {}) for i, n in enumerate(sizes))
    whole = scan(data)
    s = Scanner()
    got: list[Record | Damage] = []
    pos = 0
    for c in sorted(set(cuts)):
        s.feed(data[pos:c])
        pos = max(pos, c)
        got.extend(s.events())
    s.feed(data[pos:])
    s.end()
    got.extend(s.events())
    assert got == whole


@settings(max_examples=80, deadline=None)
@given(n=st.integers(min_value=1, max_value=15), where=st.floats(0, 1),
       bit=st.integers(0, 7), cut=st.floats(0, 1))
def test_one_flipped_bit_or_a_cut_loses_at_most_one_frame_and_never_invents_one(
        n: int, where: float, bit: int, cut: float) -> None:
    data = bytearray(b"".join(frames(n, 60)))
    pos = int(where * (len(data) - 1))
    data[pos] ^= 1 << bit
    events = scan(bytes(data[: int(len(data) * (0.5 + cut / 2))]))
    good = [e.seq for e in events if isinstance(e, Record)]
    assert good == sorted(good)
    assert set(good) <= set(range(1, n + 1))
    for e in events:
        if isinstance(e, Record):
            assert e.body == bytes([e.seq % 251]) * 60  # intact means intact
    # every byte is accounted for, as a record or as damage
    assert sum(e.size for e in events) == int(len(data) * (0.5 + cut / 2))
