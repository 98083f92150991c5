"""The fan-out's writer process: a tick's socket writes made by another process.

At 1,000 dashboards a tick is one ``os.write`` per client, 15--25 µs each on this
project's machines: 15--25 ms of every 50 ms UI interval on the hub's one Trio thread,
during which a gateway's frame that arrives waits to be read.  A writer *thread* moved the
writes off that thread but not off the GIL (docs/performance.md, "the writes in a writer
thread"): the writer waited for the GIL after every write.  A process shares no GIL.

The hub keeps every socket and every decision; per batch it writes the tick's distinct
frames once into a memory file (``memfd_create``) and hands the writer, over a
``SOCK_SEQPACKET`` Unix socket, that file, one duplicate of each chosen client's socket
(``SCM_RIGHTS``) and which frame goes to which.  The writer writes each frame once to its
socket, as far as the (non-blocking) socket takes it, closes its duplicates and answers
with the bytes written per client; the hub finishes a frame taken in part itself, as it
does for the writer thread.  The writer keeps no descriptor between messages, so a
connection's life stays the hub's.

This module imports only the standard library: the hub starts it as a script
(``python -I writer.py FD``), so the child does not load the hub.

A batch message (little-endian), the frames' file and then the clients' descriptors
beside it (SCM_RIGHTS, in the same order)::

    u32 frames, u32 clients, u32 length * frames, u32 index * clients

the frames laid end to end in the file from offset 0, in order.  A result message:
``u32 clients, f64 CPU seconds, i32 written * clients`` (0: the socket took nothing,
being full or failed).
"""

from __future__ import annotations

import array
import os
import socket
import struct
import sys
import time
from collections.abc import Iterable

#: client descriptors per message (Linux passes at most 253 descriptors, SCM_MAX_FD; one
#: of them is the frames' file)
MAX_FDS = 250

_HEAD = struct.Struct("<II")
_RESULT_HEAD = struct.Struct("<Id")


def encode_batch(lengths: list[int], index: list[int]) -> bytes:
    """A batch message's bytes: the frames' lengths and each client's frame (the frames
    and the descriptors go beside it)."""
    return (_HEAD.pack(len(lengths), len(index)) + array.array("I", lengths).tobytes()
            + array.array("I", index).tobytes())


def decode_batch(data: bytes) -> tuple[list[int], list[int]]:
    """The frames' lengths and the per-client frame indices of a batch message;
    ValueError if it is not one."""
    if len(data) < _HEAD.size:
        raise ValueError("short batch message")
    n_frames, n_clients = _HEAD.unpack_from(data)
    if len(data) != _HEAD.size + 4 * (n_frames + n_clients):
        raise ValueError("malformed batch message")
    words = array.array("I")
    words.frombytes(data[_HEAD.size:])
    lengths, index = list(words[:n_frames]), list(words[n_frames:])
    if any(i >= n_frames for i in index):
        raise ValueError("malformed batch message: a client's frame is not in it")
    return lengths, index


def encode_result(written: list[int], cpu: float) -> bytes:
    return _RESULT_HEAD.pack(len(written), cpu) + array.array("i", written).tobytes()


def decode_result(data: bytes, clients: int) -> tuple[list[int], float]:
    """Bytes written per client and the writer's CPU seconds; ValueError if ``data`` is
    not the result of a batch of ``clients``."""
    if len(data) < _RESULT_HEAD.size:
        raise ValueError("short result message")
    n, cpu = _RESULT_HEAD.unpack_from(data)
    written = array.array("i")
    written.frombytes(data[_RESULT_HEAD.size:])
    if n != clients or len(written) != n:
        raise ValueError(f"result for {n} clients, {clients} expected")
    return list(written), cpu


def read_frames(fd: int, lengths: list[int]) -> list[memoryview]:
    """The frames of a batch from its file; ValueError if the file is shorter."""
    total = sum(lengths)
    blob = os.pread(fd, total, 0) if total else b""
    if len(blob) != total:
        raise ValueError(f"frames' file holds {len(blob)} bytes, {total} expected")
    view = memoryview(blob)
    frames = []
    p = 0
    for n in lengths:
        frames.append(view[p:p + n])
        p += n
    return frames


def write_each(writes: Iterable[tuple[int, bytes | memoryview]]) -> list[int]:
    """Each frame to its (non-blocking) descriptor, as far as the socket takes it at once:
    bytes written per frame (0: none -- the socket was full, or failed: its sender writes
    the frame and meets the error).  The writer thread's loop and this process's."""
    write = os.write
    written: list[int] = []
    for fd, frame in writes:
        try:
            written.append(write(fd, frame))
        except OSError:  # BlockingIOError (full) or a failed socket
            written.append(0)
    return written


def serve(sock: socket.socket) -> None:
    """The writer's loop: a batch in, its result out, until the hub closes its end."""
    fds_size = socket.CMSG_SPACE((MAX_FDS + 1) * 4)
    while True:
        data, ancdata, flags, _ = sock.recvmsg(64 * 1024, fds_size)
        if not data:
            return  # the hub closed its end: it stopped, or it restarts its writer
        fds: list[int] = []
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(cdata[:len(cdata) - len(cdata) % 4])
                fds.extend(got)
        cpu0 = time.thread_time()
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ValueError("batch message truncated")
            lengths, index = decode_batch(data)
            if len(index) + 1 != len(fds):
                raise ValueError(f"{len(fds)} descriptors for {len(index)} clients and "
                                 "the frames' file")
            frames = read_frames(fds[0], lengths)
            written = write_each(zip(fds[1:], [frames[i] for i in index], strict=True))
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(encode_result(written, time.thread_time() - cpu0))


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[1]))
    sock.setblocking(True)  # the hub's end of the pair is non-blocking, and so was this
    try:
        serve(sock)
    except (ValueError, OSError) as exc:
        # the hub sees its end closed, counts it and starts another writer
        print(f"edgegw fan-out writer: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
