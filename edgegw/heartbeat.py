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
            await send(ping)
        if after_beat is not None:
            after_beat()


__all__ = ["Timed", "heartbeat"]
