"""The hub's side of the fan-out's writer process (``writer.py`` is the process).

``WriterProcess.run`` keeps one writer process running for as long as the hub does,
starting another when it ends (a crash is counted and logged; the ticks write from the
Trio thread meanwhile).  ``write`` hands it one tick's writes and returns what each
socket took.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import trio

from ...metrics import Metrics
from . import writer

log = logging.getLogger("edgegw.hub.fanout")

#: wait before starting a writer again after one ended, doubling to the cap
RESTART_DELAY_S = 0.5
RESTART_DELAY_MAX_S = 30.0
#: a batch not answered in this long: the writer is stuck (stopped, swapped out, wedged
#: in a write), and every tick waits for the batch before the next -- it is killed and
#: replaced (a batch of 5,000 writes took up to 0.5 s on a loaded 2-core machine)
BATCH_TIMEOUT_S = 5.0
#: messages sent ahead of their results
WINDOW = 4
#: the writer's script, run as ``python -I WRITER_SCRIPT FD``
WRITER_SCRIPT = str(Path(writer.__file__).resolve())


class WriterGone(Exception):
    """The writer process ended (or its socket failed) during a batch."""


class WriterProcess:
    """One writer process and its socket: ``ready`` while both are up."""

    def __init__(self, metrics: Metrics | None = None,
                 batch_timeout: float = BATCH_TIMEOUT_S) -> None:
        self.batch_timeout = batch_timeout
        self._m_exits = None if metrics is None else metrics.counter(
            "live_writer_process_exits_total",
            "ends of the fan-out's writer process while the hub ran (live.write_process): "
            "a crash, a kill, or a batch it did not answer in time; another is started")
        if self._m_exits is not None:
            self._m_exits.inc(0)  # on /metrics from the start, as 0
        self._sock: trio.socket.SocketType | None = None
        self._proc: trio.Process | None = None
        self._lock = trio.Lock()  # one batch at a time: results come back in order
        self.starts = 0
        self.exits = 0  # ends of a writer while the hub ran (crashes, kills)
        self.failed_batches = 0  # batches it did not answer (died, stuck, garbled)
        self.pid: int | None = None

    @property
    def ready(self) -> bool:
        return self._sock is not None

    def stats(self) -> dict[str, int | bool | None]:
        return {"running": self.ready, "pid": self.pid if self.ready else None,
                "starts": self.starts, "exits": self.exits,
                "failed_batches": self.failed_batches}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        delay = RESTART_DELAY_S
        started = False
        while True:
            ours = theirs = None
            try:
                ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                proc = await trio.lowlevel.open_process(
                    [sys.executable, "-I", WRITER_SCRIPT, str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
            except Exception as exc:  # out of descriptors, no interpreter...: not the hub's end
                for end in (ours, theirs):
                    if end is not None:
                        end.close()
                log.error("live fan-out: cannot start the writer process (%s); the hub "
                          "writes to its clients itself and tries again in %.0f s", exc, delay)
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(delay)
                delay = min(delay * 2, RESTART_DELAY_MAX_S)
                continue
            theirs.close()
            self.starts += 1
            self.pid = proc.pid
            self._proc = proc
            self._sock = ours
            if not started:
                task_status.started()
                started = True
            try:
                await proc.wait()
            finally:
                self._sock = self._proc = None
                ours.close()  # the writer, if it still runs, reads the end and exits
                with trio.CancelScope(shield=True), trio.move_on_after(2) as waited:
                    await proc.wait()
                if waited.cancelled_caught:
                    proc.kill()
            self.exits += 1
            if self._m_exits is not None:
                self._m_exits.inc()
            log.error("live fan-out: the writer process ended (exit status %s); the hub "
                      "writes to its clients itself and starts another in %.1f s",
                      proc.returncode, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, RESTART_DELAY_MAX_S)

    async def write(self, writes: list[tuple[int, bytes]]) -> tuple[list[int | None], float]:
        """Each (descriptor, frame) written by the writer process: bytes written per
        entry (0: none -- the socket was full or failed, or the writer is not running;
        None: unknown, the writer ended with it) and the writer's CPU seconds.
        The descriptors must stay open until this returns."""
        async with self._lock:
            sock = self._sock
            results: list[int | None] = [0] * len(writes)
            if sock is None:
                return results, 0.0
            frames, chunks = chunk_writes(writes)
            progress = [0, 0]  # chunks sent, chunks answered
            proc = self._proc
            memfd = -1
            try:
                # the frames once, in a memory file the writer reads: no size limit on a
                # frame, one copy per batch however many clients take it
                memfd = os.memfd_create("edgegw-live-frames", os.MFD_CLOEXEC)
                blob = b"".join(frames)
                if os.write(memfd, blob) != len(blob):
                    raise OSError("short write to the frames' memory file")
                lengths = [len(f) for f in frames]
                with trio.fail_after(self.batch_timeout):
                    cpu = await self._exchange(sock, memfd, lengths, chunks, results,
                                               progress)
            except (OSError, ValueError, WriterGone, trio.ClosedResourceError,
                    trio.TooSlowError) as exc:
                # Chunks sent and not answered: what reached those sockets is unknown.
                for _, _, slots in chunks[progress[1]:progress[0]]:
                    for slot in slots:
                        results[slot] = None
                if self._sock is sock:
                    self._sock = None
                    sock.close()  # the writer reads its end closed and exits; run restarts
                    if proc is not None and isinstance(exc, trio.TooSlowError):
                        proc.kill()  # stuck: it would not read the end
                self.failed_batches += 1
                log.error("live fan-out: the writer process failed during a batch (%s)",
                          exc if str(exc) else type(exc).__name__)
                return results, 0.0
            finally:
                if memfd >= 0:
                    os.close(memfd)  # the writer's duplicates keep it while it reads
            return results, cpu

    @staticmethod
    async def _exchange(sock: trio.socket.SocketType, memfd: int, lengths: list[int],
                        chunks: list[tuple[list[int], list[int], list[int]]],
                        results: list[int | None], progress: list[int]) -> float:
        """Send the chunks and read their results in order, up to WINDOW chunks ahead (the
        writer works on one while the next are on their way; the descriptors in flight
        count against the hub's open-file limit)."""
        cpu = 0.0
        while progress[1] < len(chunks):
            while progress[0] < len(chunks) and progress[0] - progress[1] < WINDOW:
                index, fds, _ = chunks[progress[0]]
                await sock.sendmsg([writer.encode_batch(lengths, index)], [(
                    socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [memfd, *fds]))])
                progress[0] += 1
            _, fds, slots = chunks[progress[1]]
            data = await sock.recv(1 << 20)
            if not data:
                raise WriterGone("the writer process closed its socket")
            written, took = writer.decode_result(data, len(fds))
            cpu += took
            for slot, n in zip(slots, written, strict=True):
                results[slot] = n
            progress[1] += 1
        return cpu


def chunk_writes(writes: list[tuple[int, bytes]]
                 ) -> tuple[list[bytes], list[tuple[list[int], list[int], list[int]]]]:
    """``writes`` as the batch's distinct frames and its messages: (frame index per
    client, descriptors, positions in ``writes``), each of at most MAX_FDS clients."""
    frames: list[bytes] = []
    seen: dict[bytes, int] = {}
    chunks: list[tuple[list[int], list[int], list[int]]] = []
    for start in range(0, len(writes), writer.MAX_FDS):
        index: list[int] = []
        fds: list[int] = []
        for fd, frame in writes[start:start + writer.MAX_FDS]:
            i = seen.get(frame)
            if i is None:
                i = seen[frame] = len(frames)
                frames.append(frame)
            index.append(i)
            fds.append(fd)
        chunks.append((index, fds, list(range(start, start + len(fds)))))
    return frames, chunks
