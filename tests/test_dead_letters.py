"""The gateway's dead-letter file at its edges: nothing lost, nothing twice
(docs/spool.md, "The dead-letter file").

A stored frame whose body does not decode and which the hub cannot take goes to the file
with a stand-in under the frame's own record ids, which the hub applies (it is no
duplicate); a record refused before any frame held it is kept once across a crash before
the checkpoint past it is durable; a torn last entry (a crash in its write) is cut off at
restart, so every entry written after it reads, and its record is written again, once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from disktools import DeadLetterFile, dead_letter_entry, fill_to_the_last_byte
from hubtools import gateway_config, hub_config, start_hub
from hypothesis import given, settings
from hypothesis import strategies as st
from ports import free_port
from test_frame_limits import ScriptedSource, reading

from edgegw.gateway import (
    RID_KEY,
    Gateway,
    open_dead_letter_file,
    read_dead_letter_keys,
    scan_dead_letters,
)
from edgegw.hub.store import unpack_body
from edgegw.metrics import internal_errors
from edgegw.protocol import decode_body
from edgegw.records import GatewayEvent, SensorReading, from_wire
from edgegw.spool import DiskSpool, SpoolConfig

SMALL, GIANT = 10, 5000  # unit lengths; the spool below takes frames of 4 KiB


def refusing_gateway(state_dir: Path, source: ScriptedSource) -> Gateway:
    """No hub; frames of at most 4 KiB (a quarter of the spool), so a GIANT record is
    refused; batches of 4 records, cut only when full."""
    cfg = gateway_config(state_dir, 1, batch={"max_records": 4, "max_delay_ms": 3_600_000},
                         spool={"dir": str(state_dir / "spool"), "max_bytes": 16384,
                                "segment_bytes": 4096})
    gateway = Gateway(cfg, extra_sources=[("tester", source)])
    gateway.dead_letter_path = DeadLetterFile(state_dir / "dead-letter.cborseq")  # type: ignore[assignment]
    return gateway


async def crash_image_at_first_dead_letter(tmp_path: Path, puts: list[list[int]]) -> Path:
    """Run a gateway until the first refused record's entry is written (in the file, the
    write not yet returned, the frames after it not stored): its state directory copied
    then is what a SIGKILL there leaves."""
    image = tmp_path / "image"
    gateway = refusing_gateway(tmp_path / "gw", ScriptedSource(puts))
    dead_letters = gateway.dead_letter_path
    assert isinstance(dead_letters, DeadLetterFile)
    crashed = dead_letters.image_at_next_write(tmp_path / "gw", image)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            await crashed.wait()
            nursery.cancel_scope.cancel()
    return image


async def restart(image: Path, puts: list[list[int]]) -> None:
    """The gateway started on ``image``: its source replays from the durable checkpoint;
    stopped cleanly once done."""
    async with DiskSpool.open(SpoolConfig(dir=str(image / "spool"))) as spool:
        checkpoint = spool.checkpoints.get("tester")
    source = ScriptedSource(puts, checkpoint)
    gateway = refusing_gateway(image, source)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            await source.done.wait()
            nursery.cancel_scope.cancel()


async def stored_names(spool_dir: Path) -> list[str]:
    async with DiskSpool.open(SpoolConfig(dir=str(spool_dir))) as spool:
        frames = spool.frames_from(1, 1000)
    names = []
    for f in frames:
        _, sources, wire = decode_body(f.body, 1 << 20)
        names += [r.channel for r in (from_wire(w, sources) for w in wire)
                  if isinstance(r, SensorReading)]
    return names


def kept(path: Path) -> list[tuple[Any, list[str]]]:
    """(seq, channels of its records) of every entry of the dead-letter file at ``path``
    (raises if one does not frame or decode)."""
    out = []
    for e in DeadLetterFile(path).entries():
        _, src, wire = decode_body(e["body"], 1 << 20)
        out.append((e["seq"], [from_wire(w, src).channel for w in wire]))
    return out


async def test_an_undecodable_frame_stands_in_under_its_own_record_ids_the_hub_applies_it(
        tmp_path: Path) -> None:
    """A stored frame whose body does not decode, over the hub's records per frame: it
    is dead-lettered and a stand-in event goes in its place under the frame's first
    record id (the next record id stored with it, less its records) -- read back from
    the spool's files after a restart.  The hub applies it: before, the stand-in went
    under record id 1, which the hub had applied, and dropped it as a duplicate."""
    port = free_port()
    state = tmp_path / "gw"

    def gateway() -> Gateway:
        return Gateway(gateway_config(state, port, uplink={"probe_interval_s": 0.1},
                                      batch={"max_records": 5, "max_delay_ms": 20},
                                      spool={"dir": str(state / "spool")}))

    first = gateway()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:  # no hub yet: the frames stay
            await nursery.start(first.run)
            await first.sink.put([reading(0, j, SMALL) for j in range(5)], source="tester")
            while first.store.next_seq < 2:
                await first.flush()
                await trio.sleep(0.02)
            garbage = b"\xff\x00 not a frame body"
            assert await first.store.append(garbage, 20, {RID_KEY: 6 + 20}) == 2
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        hub, _ = await start_hub(nursery, hub_config(tmp_path / "hub", port=port,
                                                     max_records_per_frame=10))
        restarted = gateway()
        await nursery.start(restarted.run)
        with trio.fail_after(30):
            while not (restarted.store.next_seq > 2
                       and restarted.store.first_unacked >= restarted.store.next_seq):
                await trio.sleep(0.02)
        got = []
        for codec, body in await hub.store.query("SELECT codec, body FROM frames"):
            first_rid, src, wire = decode_body(unpack_body(codec, body), 1 << 20)
            got += [(first_rid + i, from_wire(w, src)) for i, w in enumerate(wire)]
        events = [(rid, r.code) for rid, r in got if isinstance(r, GatewayEvent)]
        assert events == [(6, "frame_dead_lettered")], "applied under the frame's own id"
        assert sorted(rid for rid, _ in got) == list(range(1, 7))
        assert hub.metrics.counter("hub_frames_duplicate_records_total").total() == 0
        entries = DeadLetterFile(state / "dead-letter.cborseq").entries()
        assert [(e["seq"], e["body"]) for e in entries] == [(2, garbage)]
        nursery.cancel_scope.cancel()


async def test_a_refused_record_is_kept_once_across_a_crash_before_its_checkpoint(
        tmp_path: Path) -> None:
    """A crash right after a refused record's entry is written, before any frame past
    it is durable: the restarted gateway's source replays the record, which is refused
    again -- and found in the file (before: a second entry).  Every other record is
    stored once."""
    puts = [[SMALL], [GIANT], [SMALL, SMALL], [SMALL, SMALL, SMALL, SMALL]]
    image = await crash_image_at_first_dead_letter(tmp_path, puts)
    assert kept(image / "dead-letter.cborseq") == [(None, ["put1-0"])]

    await restart(image, puts)
    assert kept(image / "dead-letter.cborseq") == [(None, ["put1-0"])], "kept once"
    expected = [f"put{i}-{j}" for i, put in enumerate(puts) for j in range(len(put))]
    assert await stored_names(image / "spool") == [n for n in expected if n != "put1-0"]


async def test_a_torn_last_entry_is_cut_off_at_restart_and_written_again_once(
        tmp_path: Path) -> None:
    """A crash in the middle of a refused record's entry (its last bytes never written):
    the restarted gateway cuts the torn entry off before writing, so the entries it
    writes next -- the replayed record's, once, and a new one's -- all read (before: they
    followed the torn bytes, and no reader could frame them)."""
    puts = [[SMALL], [GIANT], [SMALL, SMALL], [SMALL, GIANT, SMALL, SMALL], [SMALL]]
    image = await crash_image_at_first_dead_letter(tmp_path, puts)
    path = image / "dead-letter.cborseq"
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])  # torn: the rest never reached the disk

    await restart(image, puts)
    assert kept(path) == [(None, ["put1-0"]), (None, ["put3-1"])]
    expected = [f"put{i}-{j}" for i, put in enumerate(puts) for j in range(len(put))]
    assert await stored_names(image / "spool") == [
        n for n in expected if n not in ("put1-0", "put3-1")]


def test_opening_cuts_off_a_torn_or_zeroed_tail_and_leaves_damage_before_it(
        tmp_path: Path) -> None:
    """Only the last entry can be torn (each is fsynced before the next): cut off whether
    its bytes stop short or are zeros (a size that reached the disk, data that did
    not); damage followed by whole entries is no crash's and is left as it is."""
    def entry(i: int) -> bytes:
        return dead_letter_entry(seq=None, epoch="e", reason="r", at=0.0, source="s", rid=i,
                                 body=bytes([i]))

    path = tmp_path / "dead-letter.cborseq"
    whole = entry(1) + entry(2)
    for tail in (entry(3)[:7], entry(3)[:2], b"\0" * 40):
        path.write_bytes(whole + tail)
        found = open_dead_letter_file(str(path), "e", 2)
        assert path.read_bytes() == whole
        assert found == {("s", bytes([2])): 1}, "entries at or after rid 2"
    damaged = whole + b"\0\0\0\5junk!" + entry(4)
    path.write_bytes(damaged)
    open_dead_letter_file(str(path), "e", 1)
    assert path.read_bytes() == damaged


def entry_bytes(i: int, seq: int | None = None) -> bytes:
    return dead_letter_entry(seq=seq, epoch="e", reason="r", at=0.0, source="s", rid=i,
                             body=cbor2.dumps([i, ["s"], [[11, 0, 0.0, "c", 1.0]]]))


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1:]


#: damage that is no crash's, before whole entries: each reader skips it and reads on
DAMAGE = {
    "garbage": lambda e: e(1) + b"\x07\xff garbage \x00\x01" * 9 + e(2) + e(3),
    "entry_cut_short": lambda e: e(1) + e(9)[:-6] + e(2) + e(3),
    "length_flipped": lambda e: flip(e(1), 1) + e(2) + e(3),  # says ~5 MB: past the end
    "map_head_flipped": lambda e: flip(e(1), 4) + e(2) + e(3),
    "zeros_between": lambda e: e(1) + b"\0" * 64 + e(2) + e(3),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_every_reader_resyncs_past_damage_and_sees_the_entries_after_it(
        tmp_path: Path, damage: str) -> None:
    """Damage in the middle of the file (a bad sector, a flipped bit, an entry another
    tool cut short): the entries after it are read -- the gateway checks them for repeats,
    and one it did not see would be written a second time (before, both readers stopped
    at the damage).  The damage is left in place; a torn end is still cut."""
    path = tmp_path / "dead-letter.cborseq"
    data = DAMAGE[damage](entry_bytes)
    scan = scan_dead_letters(data)
    rids = [e["rid"] for _, e in scan.entries]
    assert rids[-2:] == [2, 3] and scan.damaged and scan.torn_at is None
    assert scan.entries[-1][0] + len(entry_bytes(3)) == len(data)

    path.write_bytes(data)
    found = open_dead_letter_file(str(path), "e", 2)
    assert path.read_bytes() == data, "damage before whole entries is left as it is"
    assert found == {("s", e["body"]): 1 for _, e in scan.entries if e["rid"] >= 2}
    torn = data + entry_bytes(4)[:9]
    path.write_bytes(torn)
    open_dead_letter_file(str(path), "e", 2)
    assert path.read_bytes() == data, "a torn last entry is still cut off"

    frames = b"".join(entry_bytes(i, seq=10 + i) for i in (2, 3))
    path.write_bytes(DAMAGE[damage](entry_bytes)[:-len(entry_bytes(2) + entry_bytes(3))]
                     + frames)
    assert read_dead_letter_keys(str(path), "e", 11) == {("e", 12, 2, 1), ("e", 13, 3, 1)}


async def test_a_refused_record_after_damage_is_still_kept_once_across_a_crash(
        tmp_path: Path) -> None:
    """As the crash test above, with damage before the refused record's entry: the restart
    still finds the entry and does not write it again (before, it stopped reading at the
    damage and wrote a second entry)."""
    puts = [[SMALL], [GIANT], [SMALL, SMALL], [SMALL, SMALL, SMALL, SMALL]]
    image = await crash_image_at_first_dead_letter(tmp_path, puts)
    path = image / "dead-letter.cborseq"
    path.write_bytes(b"\0\0\0\x05junk!" + path.read_bytes())

    await restart(image, puts)
    scan = scan_dead_letters(path.read_bytes())
    assert len(scan.damaged) == 1 and scan.torn_at is None
    assert len(scan.entries) == 1, "kept once"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(n=st.integers(1, 6), at=st.integers(0, 6), junk=st.binary(min_size=1, max_size=300),
       cut=st.integers(0, 40))
def test_any_damage_between_entries_is_skipped_and_every_entry_after_it_is_read(
        n: int, at: int, junk: bytes, cut: int) -> None:
    """Bytes of any kind between two entries, or an entry cut short by up to 40 bytes
    before the next one: every whole entry after the damage is read, and none is made up."""
    entries = [entry_bytes(i) for i in range(n)]
    at = min(at, n)
    if cut and at > 0:  # the entry before the damage loses its last bytes
        entries[at - 1] = entries[at - 1][:max(1, len(entries[at - 1]) - cut)]
    data = b"".join(entries[:at]) + junk + b"".join(entries[at:])
    scan = scan_dead_letters(data)
    found = [e["rid"] for _, e in scan.entries]
    if at < n:
        assert found[-(n - at):] == list(range(at, n))
    assert set(found) <= set(range(n))
    assert len(found) == len(set(found))


async def test_a_refused_record_on_a_full_disk_waits_for_room_and_is_kept_once(
        tiny_fs: Path, tmp_path: Path) -> None:
    """The dead-letter file is the only copy the gateway keeps of a refused record: when its
    disk is full the record waits (and what follows it, as the spool's appends wait) until
    there is room, then is kept once -- before, it was counted as an internal error and lost.
    A write the full disk cut short leaves no torn entry behind."""
    state = tiny_fs / "gw"
    cfg = gateway_config(state, free_port(), spool={"dir": str(tmp_path / "spool")},
                         uplink={"max_frame_bytes": 65536},
                         batch={"max_records": 10, "max_delay_ms": 20})
    gateway = Gateway(cfg)
    dead = DeadLetterFile(state / "dead-letter.cborseq")
    giant = SensorReading("s", 1.0, "c", 1.0, "x" * 100_000)  # alone over any frame
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        filler = fill_to_the_last_byte(tiny_fs)
        # room for a part of the entry: the write takes some of it, then fails
        room = (await trio.Path(filler).stat()).st_size - 40_000
        await trio.to_thread.run_sync(os.truncate, filler, room)
        with trio.fail_after(30):
            await gateway.sink.put([giant], source="s")
            await gateway.sink.put([SensorReading("s", 2.0, "c", 2.0)], source="s")
            await trio.sleep(1.5)  # the flusher tries, finds the disk full, waits
        assert dead.entries() == []  # no entry, torn or whole
        assert gateway.healthy() == (False, "dead-letter file: disk full")
        stored = gateway.store.next_seq
        filler.unlink()
        with trio.fail_after(30):
            while not dead.entries():
                await trio.sleep(0.05)
            await gateway.flush()
            while gateway.store.next_seq == stored:  # the reading behind it is stored
                await trio.sleep(0.05)
        assert gateway.healthy() == (True, "ok")
        nursery.cancel_scope.cancel()
    (entry,) = dead.entries()
    _, sources, wire = decode_body(entry["body"], 1 << 20)
    assert [from_wire(w, sources) for w in wire] == [giant]
    assert entry["seq"] is None and entry["source"] == "s"
    assert internal_errors(gateway.metrics).get(where="dead_letter") == 0
    size = (await dead.path.stat()).st_size
    assert gateway.metrics.as_dict()["gateway_dead_letter_bytes"] == size
