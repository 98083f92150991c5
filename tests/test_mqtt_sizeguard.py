"""The MQTT size guard (sans-IO): every packet passes through unchanged, however the bytes
are split, except a PUBLISH whose payload is over the limit, which comes out as the same
PUBLISH carrying only a mark with its length, its payload dropped as it arrives."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgegw.mqtt import OVERSIZE_MARK, PublishSizeGuard, oversize_length


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte + (128 if n else 0))
        if not n:
            return bytes(out)


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


@dataclasses.dataclass(frozen=True)
class Publish:
    topic: bytes
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: bytes = b""  # MQTT 5 only

    def variable_header(self, v5: bool, properties: bytes | None = None) -> bytes:
        props = self.properties if properties is None else properties
        return (len(self.topic).to_bytes(2, "big") + self.topic
                + (b"\x00\x07" if self.qos else b"")
                + (varint(len(props)) + props if v5 else b""))

    def first(self) -> int:
        return 0x30 | (self.qos << 1) | int(self.retain)

    def encode(self, v5: bool) -> bytes:
        return packet(self.first(), self.variable_header(v5) + self.payload)

    def expected(self, v5: bool, limit: int) -> bytes:
        if len(self.payload) <= limit:
            return self.encode(v5)
        # properties are dropped from a cut message; the mark carries the payload length
        mark = OVERSIZE_MARK + str(len(self.payload)).encode()
        return packet(self.first(), self.variable_header(v5, b"") + mark)


OTHERS = [b"\xd0\x00", b"\x40\x02\x00\x07", b"\x90\x03\x00\x01\x01", b"\x20\x02\x00\x00"]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


publishes = st.builds(
    Publish,
    topic=st.binary(min_size=1, max_size=40),
    payload=st.one_of(st.binary(max_size=60), st.integers(0, 3000).map(lambda n: b"p" * n)),
    qos=st.integers(0, 2), retain=st.booleans(),
    properties=st.one_of(st.just(b""), st.just(b"\x23\x00\x05")))  # topic alias 5
stream = st.lists(st.one_of(publishes, st.sampled_from(OTHERS)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(stream, st.booleans(), st.integers(0, 200), st.lists(st.integers(0, 10**6), max_size=40))
def test_only_payloads_over_the_limit_are_cut_however_the_bytes_arrive(
        packets: list[Publish | bytes], v5: bool, limit: int, cuts: list[int]) -> None:
    data = b"".join(p if isinstance(p, bytes) else p.encode(v5) for p in packets)
    expected = b"".join(p if isinstance(p, bytes) else p.expected(v5, limit) for p in packets)
    guard = PublishSizeGuard(limit, v5=v5)
    out = b"".join(guard.feed(chunk) for chunk in split(data, cuts))
    assert out == expected
    over = [p for p in packets if isinstance(p, Publish) and len(p.payload) > limit]
    assert guard.cut == len(over)
    assert guard.dropped_bytes == sum(len(p.payload) for p in over) + sum(
        len(p.properties) for p in over if v5)


def test_stream_of_whole_packets_is_handed_on_without_a_copy() -> None:
    data = Publish(b"t", b"21.5").encode(False) * 100
    assert PublishSizeGuard(1024, v5=False).feed(data) is data


def test_an_oversize_payload_is_dropped_as_it_arrives_never_held() -> None:
    """50 MB arriving in 64 KiB reads: after the variable header nothing is kept, and the
    message after it comes through whole."""
    size = 50_000_000
    head = packet(0x32, b"\x00\x05a/b/c\x00\x09")[:1] + varint(2 + 5 + 2 + size) \
        + b"\x00\x05a/b/c\x00\x09"
    guard = PublishSizeGuard(65536, v5=False)
    out = [guard.feed(head)]
    chunk = b"x" * 65536
    left = size
    while left:
        piece = chunk[:min(left, len(chunk))]
        out.append(guard.feed(piece))
        left -= len(piece)
    after = Publish(b"a/b/c", b"22.0").encode(False)
    out.append(guard.feed(after))
    assert out[0] == packet(0x32, b"\x00\x05a/b/c\x00\x09" + OVERSIZE_MARK + b"50000000")
    assert all(piece == b"" for piece in out[1:-1])
    assert out[-1] == after
    assert guard.dropped_bytes == size


def test_mqtt5_properties_over_64_kib_are_dropped_with_the_payload() -> None:
    big_props = b"\x26\xff\xff" + b"k" * 65535 + b"\x00\x00" + b"\x26\x00\x01k\x00\x00"
    msg = Publish(b"t", b"1", qos=1, properties=big_props)
    guard = PublishSizeGuard(10, v5=True)
    out = guard.feed(msg.encode(True))
    dropped = len(big_props) + 1
    assert out == packet(0x32, b"\x00\x01t\x00\x07\x00" + OVERSIZE_MARK + str(dropped).encode())
    assert oversize_length(out[-len(OVERSIZE_MARK) - len(str(dropped)):]) == dropped
    # a small property block passes with a small payload
    small = Publish(b"t", b"1", properties=b"\x23\x00\x05")
    assert PublishSizeGuard(10, v5=True).feed(small.encode(True)) == small.encode(True)


@pytest.mark.parametrize("payload", [b"", b"21.5", b'{"value": 1}', OVERSIZE_MARK,
                                     OVERSIZE_MARK + b"12x", b"\xff\x00"])
def test_only_the_guards_own_mark_reads_as_a_cut_message(payload: bytes) -> None:
    assert oversize_length(payload) is None
    assert oversize_length(OVERSIZE_MARK + b"123") == 123


def test_malformed_framing_passes_through_for_paho_to_refuse() -> None:
    junk = b"\x30\xff\xff\xff\xff\xff" + b"rest of the stream"
    guard = PublishSizeGuard(4, v5=False)
    assert guard.feed(junk[:3]) + guard.feed(junk[3:]) == junk
    # a topic length past the packet's end: unchanged
    bad = packet(0x30, b"\xff\xff" + b"x" * 10)
    assert PublishSizeGuard(4, v5=False).feed(bad) == bad
