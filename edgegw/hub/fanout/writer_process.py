"""The hub's side of the fan-out's writer process (``writer.py`` is the process).

``WriterProcess.run`` keeps one writer process running for as long as the hub does,
starting another when it ends (a crash is counted and logged; the ticks write from the
Trio thread meanwhile).  ``write`` hands it one tick's writes and returns what each
socket took.
"""

from __future__ import annotations

import array
import logging
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
            ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                proc = await trio.lowlevel.open_process(
                    [sys.executable, "-I", WRITER_SCRIPT, str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
            except OSError as exc:
                ours.close()
                theirs.close()
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
        entry (0: none -- the socket was full or failed, or the frame was too large to
        hand over; None: unknown, the writer ended with it) and the writer's CPU seconds.
        The descriptors must stay open until this returns."""
        async with self._lock:
            sock = self._sock
            results: list[int | None] = [0] * len(writes)
            if sock is None:
                return results, 0.0
            chunks = chunk_writes(writes)
            progress = [0, 0]  # chunks sent, chunks answered
            proc = self._proc
            try:
                with trio.fail_after(self.batch_timeout):
                    cpu = await self._exchange(sock, chunks, results, progress)
            except (OSError, ValueError, WriterGone, trio.ClosedResourceError,
                    trio.TooSlowError) as exc:
                # Chunks sent and not answered: what reached those sockets is unknown.
                for _, _, _, slots in chunks[progress[1]:progress[0]]:
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
            return results, cpu

    @staticmethod
    async def _exchange(sock: trio.socket.SocketType,
                        chunks: list[tuple[list[bytes], list[int], list[int], list[int]]],
                        results: list[int | None], progress: list[int]) -> float:
        """Send the chunks and read their results in order, up to WINDOW chunks ahead (the
        writer works on one while the next are on their way; the descriptors in flight
        count against the hub's open-file limit)."""
        cpu = 0.0
        while progress[1] < len(chunks):
            while progress[0] < len(chunks) and progress[0] - progress[1] < WINDOW:
                frames, index, fds, _ = chunks[progress[0]]
                await sock.sendmsg([writer.encode_batch(frames, index)], [(
                    socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                progress[0] += 1
            _, _, fds, slots = chunks[progress[1]]
            data = await sock.recv(1 << 20)
            if not data:
                raise WriterGone("the writer process closed its socket")
            written, took = writer.decode_result(data, len(fds))
            cpu += took
            for slot, n in zip(slots, written, strict=True):
                results[slot] = max(n, 0)
            progress[1] += 1
        return cpu


def chunk_writes(writes: list[tuple[int, bytes]]
            ) -> list[tuple[list[bytes], list[int], list[int], list[int]]]:
    """``writes`` cut into messages: (distinct frames, frame index per client,
    descriptors, positions in ``writes``); each within MAX_FDS descriptors and
    MAX_PAYLOAD bytes of frames.  A frame over MAX_PAYLOAD is left out (written 0)."""
    chunks: list[tuple[list[bytes], list[int], list[int], list[int]]] = []
    frames: list[bytes] = []
    seen: dict[bytes, int] = {}
    index: list[int] = []
    fds: list[int] = []
    slots: list[int] = []
    payload = 0
    for slot, (fd, frame) in enumerate(writes):
        i = seen.get(frame)
        if i is None:
            size = len(frame)
            if size > writer.MAX_PAYLOAD:
                continue
            if payload + size > writer.MAX_PAYLOAD:
                chunks.append((frames, index, fds, slots))
                frames, seen, index, fds, slots, payload = [], {}, [], [], [], 0
            i = seen[frame] = len(frames)
            frames.append(frame)
            payload += size
        index.append(i)
        fds.append(fd)
        slots.append(slot)
        if len(fds) == writer.MAX_FDS:
            chunks.append((frames, index, fds, slots))
            frames, seen, index, fds, slots, payload = [], {}, [], [], [], 0
    if fds:
        chunks.append((frames, index, fds, slots))
    return chunks
