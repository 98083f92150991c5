"""The Trio driver of a wire-protocol connection's timer, for both ends of the link.

The sans-IO connection (``edgegw.protocol``) decides when a PING is due and when the peer
has been silent too long -- also while a PING's send waits; this loop only sleeps until
its deadline and hands what it says to the task that sends.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import trio


class Timed(Protocol):
    def next_deadline(self) -> float: ...

    def on_timer(self, now: float) -> bytes | None: ...

    def ping_started(self) -> None: ...

    def ping_done(self) -> None: ...


async def heartbeat(conn: Timed, send: Callable[[bytes], Awaitable[object]],
                    after_beat: Callable[[], None] | None = None) -> None:
    """PING when due (``send``), until cancelled; ``ProtocolError`` out of ``on_timer``
    when the peer is silent too long; what ``send`` raises, as it raised it.
    ``after_beat`` runs after every timer event.

    The PINGs are sent by a task of their own, so the timer keeps running while one waits:
    a peer that reads nothing (SIGSTOP, a frozen VM) fills the socket buffers and the send
    waits as long as the pause lasts -- a timeout checked only after it would never fire
    (seen: a gateway stuck on a hub paused for 4 s, tests/test_pause.py).  The connection
    knows a PING is in flight (``ping_started`` ... ``ping_done``) and hands out no other."""
    to_send, pings = trio.open_memory_channel[bytes](1)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pinger, conn, send, pings)
            while True:
                await trio.sleep_until(conn.next_deadline())
                ping = conn.on_timer(trio.current_time())
                if ping is not None:
                    conn.ping_started()
                    to_send.send_nowait(ping)  # room: no PING is handed out while one waits
                if after_beat is not None:
                    after_beat()
    except BaseExceptionGroup as group:
        # what the send or the timer raised (a closed connection, a cancellation, the
        # silence), as it was raised: callers look for those types
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


async def _pinger(conn: Timed, send: Callable[[bytes], Awaitable[object]],
                  pings: trio.MemoryReceiveChannel[bytes]) -> None:
    async for ping in pings:
        try:
            await send(ping)
        finally:
            conn.ping_done()


__all__ = ["Timed", "heartbeat"]
