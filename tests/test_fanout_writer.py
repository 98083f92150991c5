"""The fan-out's writer process (``live.write_process``): its messages, how a tick's writes
are cut into them, and what its death costs the clients -- at most a reconnect, never a
frame lost, repeated or torn inside a connection that goes on."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import cbor2
import pytest
import trio
from test_fanout import RawClient, start_live_hub, wait_for

from edgegw.hub.fanout import (
    WRITER_MAX_FDS,
    WRITER_SCRIPT,
    LiveConfig,
    WriterProcess,
    chunk_writes,
    decode_batch,
    decode_result,
    encode_batch,
    encode_result,
)


def test_a_batch_message_names_each_clients_frame() -> None:
    lengths = [10, 0, 600]
    index = [2, 0, 0, 1, 2]
    data = encode_batch(lengths, index)
    assert len(data) == 8 + 4 * 3 + 4 * 5
    assert decode_batch(data) == (lengths, index)
    assert decode_result(encode_result([5, 0, -1], 0.25), 3) == ([5, 0, -1], 0.25)


@pytest.mark.parametrize("data", [
    b"", b"\x01\x00\x00\x00",  # shorter than its header
    encode_batch([3], [0])[:-1],  # cut
    encode_batch([3], [0]) + b"\x00",  # a byte too many
    encode_batch([3], [1]),  # a client pointing past the frames
    b"\xff\xff\xff\xff\x01\x00\x00\x00",  # lengths it does not hold
])
def test_a_malformed_batch_message_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_batch(data)


def test_a_result_for_another_batch_is_refused() -> None:
    with pytest.raises(ValueError):
        decode_result(encode_result([1, 2], 0.0), 3)
    with pytest.raises(ValueError):
        decode_result(b"\x01", 1)


def test_a_batch_is_cut_into_messages_of_at_most_max_fds_clients() -> None:
    small = [b"s%d" % (i % 3) for i in range(3)]
    writes = [(100 + i, small[i % 3]) for i in range(2 * WRITER_MAX_FDS + 17)]
    writes.append((900, b"B" * 300_000))
    frames, chunks = chunk_writes(writes)
    assert len(frames) == len(set(frames)) == 4  # each distinct frame once per batch
    assert [len(fds) for _, fds, _ in chunks] == [WRITER_MAX_FDS, WRITER_MAX_FDS, 18]
    slots = [s for *_, ss in chunks for s in ss]
    assert slots == list(range(len(writes)))
    for index, fds, ss in chunks:
        pairs = [(fd, frames[i]) for fd, i in zip(fds, index, strict=True)]
        assert pairs == [writes[s] for s in ss]


async def test_the_writer_writes_every_frame_whatever_its_size() -> None:
    """Frames of any size (one larger than a Unix socket message could carry), to more
    clients than one message's descriptors: each socket gets its own frame, as far as it
    takes it at once, and a full socket is reported, not waited for."""
    writer = WriterProcess()
    pairs = [socket.socketpair() for _ in range(WRITER_MAX_FDS + 30)]
    try:
        for ours, _ in pairs:
            ours.setblocking(False)
        frames = [os.urandom(n) for n in (0, 1, 5000, 3_000_000)]
        writes = [(ours.fileno(), frames[k % len(frames)]) for k, (ours, _) in enumerate(pairs)]
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            written, cpu = await writer.write(writes)
            nursery.cancel_scope.cancel()
        assert cpu >= 0 and writer.failed_batches == 0
        for (_, frame), n, (_, theirs) in zip(writes, written, pairs, strict=True):
            assert n is not None and 0 <= n <= len(frame)
            if len(frame) <= 5000:
                assert n == len(frame)  # fits any socket buffer
            else:
                assert 0 < n < len(frame)  # 3 MB does not: taken in part, not waited for
            theirs.setblocking(False)
            got = b""
            with contextlib.suppress(BlockingIOError):
                while chunk := theirs.recv(1 << 22):
                    got += chunk
            assert got == frame[:n]
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_the_writer_process_is_linux_only() -> None:
    errors = dict(LiveConfig(write_process=True).validate())
    if sys.platform.startswith("linux"):
        assert "write_process" not in errors
    else:
        assert "write_process" in errors


async def test_a_stuck_or_killed_writer_process_costs_its_clients_at_most_a_reconnect(
        tmp_path: Path) -> None:
    """The writer stopped (SIGSTOP) with a batch in it: after ``batch_timeout`` the hub
    kills it, disconnects the clients of that batch (what reached their sockets is
    unknown: they reconnect and resume with a snapshot), starts another writer and hands
    it the ticks again, writing itself meanwhile.  Then SIGKILL to the new one: the same
    again.  The hub runs on throughout, and every client that stays connected gets every
    event once, in order, in whole frames."""
    async with trio.open_nursery() as nursery:
        hub, port, fanout, _state = await start_live_hub(
            nursery, tmp_path, queue_frames=10_000, stall_timeout=30.0, write_process=True)
        fanout.writer.batch_timeout = 0.5
        first = fanout.writer.pid
        assert fanout.writer.ready and first is not None
        fanout.publish("alert/P0/yield_low", {"event": "raised", "n": 0})
        clients: list[RawClient] = []
        received: list[list[tuple[int, bytes]]] = []
        ended: list[bool] = []

        async def read(k: int, client: RawClient) -> None:
            try:
                async for frame in client.frames():
                    received[k].append(frame)
            except OSError:  # reset by the hub
                pass
            ended[k] = True

        async def connect(readers: trio.Nursery, count: int) -> None:
            for _ in range(count):
                clients.append(await RawClient.connect(port, ["alert/#"]))
                received.append([])
                ended.append(False)
                readers.start_soon(read, len(clients) - 1, clients[-1])
            await wait_for(lambda: sum(bool(c.positions)
                                       for c in fanout.core.clients.values()) == len(clients)
                           - sum(ended))

        n = 0
        publishing = True

        async def publish() -> None:
            nonlocal n
            while publishing:
                for _ in range(4):
                    n += 1
                    fanout.publish("alert/P0/yield_low",
                                   {"event": "raised", "n": n, "pad": "x" * 3000})
                await trio.sleep(0.005)

        async with trio.open_nursery() as readers:
            await connect(readers, 12)
            readers.start_soon(publish)
            await wait_for(lambda: fanout.stats()["write_batches"] > 3)
            os.kill(first, signal.SIGSTOP)
            await wait_for(fanout.batch_in_writer)  # a batch is in the writer
            await wait_for(lambda: fanout.writer.ready and fanout.writer.pid != first, 20)
            assert fanout.writer.exits == 1 and fanout.writer.failed_batches == 1
            assert any(ended)  # the stuck batch's clients, cut off
            second = fanout.writer.pid
            assert second is not None
            await connect(readers, 4)  # new dashboards, served by the new writer
            batches = fanout.stats()["write_batches"]
            await wait_for(lambda: fanout.stats()["write_batches"] > batches + 3)
            os.kill(second, signal.SIGKILL)
            await wait_for(lambda: fanout.writer.ready and fanout.writer.pid != second, 20)
            batches = fanout.stats()["write_batches"]
            await wait_for(lambda: fanout.stats()["write_batches"] > batches + 3)
            publishing = False
            await trio.sleep(0.01)

            def caught_up(k: int) -> bool:
                if ended[k]:
                    return True
                messages = [cbor2.loads(p) for op, p in received[k][-8:] if op == 0x2]
                return any(d.get("n") == n for m in messages if m["type"] == "batch"
                           for i in m["items"] for d in i["data"])

            await wait_for(lambda: all(caught_up(k) for k in range(len(clients))), 20)
            readers.cancel_scope.cancel()
        assert fanout.writer.exits == 2 and fanout.writer.starts == 3
        assert hub.metrics.counter("live_writer_process_exits_total").get() == 2
        writer = fanout.stats()["writer_process"]
        # the stuck batch, and one the new writer's death may have cut short
        assert writer["running"] and writer["exits"] == 2 and writer["failed_batches"] >= 1
        for k, frames in enumerate(received):
            events = [d["n"] for op, p in frames if op == 0x2
                      for i in cbor2.loads(p).get("items", ()) for d in i["data"]]
            assert events == list(range(events[0], events[0] + len(events)))
            if not ended[k]:
                assert events[-1] == n
        for client in clients:
            client.sock.close()
        nursery.cancel_scope.cancel()


async def test_the_writer_process_ends_with_the_hub(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        _hub, _port, fanout, _state = await start_live_hub(
            nursery, tmp_path, write_process=True)
        pid = fanout.writer.pid
        assert pid is not None
        nursery.cancel_scope.cancel()
    with pytest.raises(ProcessLookupError):  # reaped: not left running, nor a zombie
        os.kill(pid, 0)


def test_a_writer_given_a_malformed_batch_exits_and_closes_what_it_was_given(
        tmp_path: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([sys.executable, "-I", WRITER_SCRIPT, str(theirs.fileno())],
                            pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE)
    theirs.close()
    a, b = socket.socketpair()
    socket.send_fds(ours, [b"\x01\x00\x00\x00\x05\x00\x00\x00"], [a.fileno()])
    a.close()
    assert proc.wait(10) == 1
    assert b"malformed batch message" in proc.stderr.read()
    assert b.recv(1) == b""  # its copy of the descriptor is closed: the peer sees the end


async def test_a_writer_that_cannot_start_leaves_the_hub_writing_itself_until_one_can(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    async with trio.open_nursery() as nursery:
        _hub, port, fanout, _state = await start_live_hub(
            nursery, tmp_path, write_process=True)
        assert not fanout.writer.ready and fanout.writer.starts == 0
        client = await RawClient.connect(port, ["alert/#"])
        fanout.publish("alert/P0/yield_low", {"event": "raised", "n": 1})
        async for op, payload in client.frames():  # written by the Trio thread
            if op == 0x2 and cbor2.loads(payload)["type"] == "batch":
                break
        monkeypatch.undo()  # an interpreter again: the next try starts the writer
        await wait_for(lambda: fanout.writer.ready, 10)
        assert fanout.writer.starts == 1 and fanout.writer.exits == 0
        client.sock.close()
        nursery.cancel_scope.cancel()
