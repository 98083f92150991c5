"""TCP options that make the kernel give up on a peer that vanished without a reset.

A host that loses power, a pulled cable, a frozen VM: no FIN, no RST ever comes.  What an
end writes to such a peer sits unacknowledged in its kernel, retransmitted for about 15
minutes (``tcp_retries2``), and every write meanwhile succeeds into the send buffer: an end
that is not reading -- the hub while a commit holds its reads back -- cannot tell.
``TCP_USER_TIMEOUT`` (Linux) bounds that: data unacknowledged for that long ends the
connection with ETIMEDOUT, which the next read or write reports.

It counts a zero window too (tcp(7): "buffered data may remain untransmitted due to zero
window size"): a live peer that does not read for that long while we have data for it is
cut as well.  So an end sets it only towards a peer the protocol requires to keep reading
(the hub towards its gateways: docs/protocol.md section 7), never towards one allowed to
hold its reads back (the gateway towards a busy hub).

Keepalive covers an idle connection, where nothing is written and so nothing is ever
unacknowledged: with ``TCP_USER_TIMEOUT`` set the kernel then ends the connection at the
first probe due after that long without hearing from the peer.

Elsewhere (Windows, macOS, BSD) the options that exist are set and the rest skipped: the
application heartbeat still finds the peer, only later.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

log = logging.getLogger(__name__)

#: Linux only (Python exposes the constant where the platform has it)
USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)
#: keepalive timing per socket: Linux, and Windows and macOS in recent Pythons
KEEPIDLE = getattr(socket, "TCP_KEEPIDLE", None)
KEEPINTVL = getattr(socket, "TCP_KEEPINTVL", None)


def socket_of(stream: Any) -> socket.socket | Any | None:
    """The socket under a Trio stream (under TLS too), or None (an in-memory stream)."""
    stream = getattr(stream, "transport_stream", stream)
    return getattr(stream, "socket", None)


def give_up_after(sock: Any, timeout_s: float, *, keepalive_s: float | None = None) -> bool:
    """Let the kernel end ``sock``'s connection once what it wrote has gone unacknowledged
    for ``timeout_s`` (``TCP_USER_TIMEOUT``).  With ``keepalive_s``, also probe the peer
    after that long idle and every ``keepalive_s`` after (the connection then ends at the
    first probe due after ``timeout_s`` of silence).  True if the timeout is set: False on
    a platform without it, or a socket that refuses it (not TCP, closed already) -- a
    connection without the bound, not a failure."""
    if sock is None:
        return False
    if keepalive_s is not None:
        _set(sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        seconds = max(1, round(keepalive_s))
        if KEEPIDLE is not None:
            _set(sock, socket.IPPROTO_TCP, KEEPIDLE, seconds)
        if KEEPINTVL is not None:
            _set(sock, socket.IPPROTO_TCP, KEEPINTVL, seconds)
    if USER_TIMEOUT is None:
        return False
    return _set(sock, socket.IPPROTO_TCP, USER_TIMEOUT, max(1, round(timeout_s * 1000)))


def _set(sock: Any, level: int, option: int, value: int) -> bool:
    try:
        sock.setsockopt(level, option, value)
        return True
    except (OSError, AttributeError) as exc:  # gone already, or not a TCP socket
        log.debug("setsockopt(%d, %d, %d) failed: %s", level, option, value, exc)
        return False


__all__ = ["give_up_after", "socket_of"]
