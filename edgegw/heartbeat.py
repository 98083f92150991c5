"""The Trio driver of a wire-protocol connection's timer, for both ends of the link.

The sans-IO connection (``edgegw.protocol``) decides when a PING is due and when the peer
has been silent too long; this loop only sleeps until its deadline and sends what it says.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import trio


class Timed(Protocol):
    def next_deadline(self) -> float: ...

    def on_timer(self, now: float) -> bytes | None: ...


async def heartbeat(conn: Timed, send: Callable[[bytes], Awaitable[object]],
                    after_beat: Callable[[], None] | None = None) -> None:
    """PING when due (``send``), until cancelled; ``ProtocolError`` out of ``on_timer``
    when the peer is silent too long.  ``after_beat`` runs after every timer event."""
    while True:
        await trio.sleep_until(conn.next_deadline())
        ping = conn.on_timer(trio.current_time())
        if ping is not None:
            await _send_judging_silence(conn, send, ping)
        if after_beat is not None:
            after_beat()


async def _send_judging_silence(conn: Timed, send: Callable[[bytes], Awaitable[object]],
                                ping: bytes) -> None:
    """``send(ping)``, the peer's silence still judged while it waits.  A peer that reads
    nothing (a paused process: SIGSTOP, a frozen VM) fills the socket buffers, and the send
    waits as long as the pause lasts: a timeout checked only after it would never fire
    (seen: a gateway stuck on a hub paused for 4 s, tests/test_pause.py)."""
    silent: Exception | None = None
    try:
        async with trio.open_nursery() as nursery:
            async def judge() -> None:
                nonlocal silent
                while True:
                    await trio.sleep_until(conn.next_deadline())
                    try:
                        # a PING it says is due is not sent: one is in flight already
                        conn.on_timer(trio.current_time())
                    except Exception as exc:  # the peer is silent too long
                        silent = exc
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(judge)
            await send(ping)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # what the send raised (a closed connection, a cancellation), as it raised it
        # before this nursery: callers look for those types
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    if silent is not None:
        raise silent


__all__ = ["Timed", "heartbeat"]
