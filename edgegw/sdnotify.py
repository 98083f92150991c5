"""systemd's notify protocol (Type=notify, WatchdogSec=), without a library.

``READY=1`` once the service listens; ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` from
a task in the Trio loop itself, so a wedged loop stops the pings and systemd restarts the
service.  Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import os
import socket

import trio


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    return "\0" + addr[1:] if addr.startswith("@") else addr


async def notify(message: str) -> bool:
    """Send one datagram to systemd; False when not running under it."""
    addr = _address()
    if addr is None:
        return False
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock:
        await sock.connect(addr)
        await sock.send(message.encode())
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog timeout in seconds, if systemd asked for pings."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


async def watchdog(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Ping systemd's watchdog for as long as the Trio loop is alive."""
    interval = watchdog_interval()
    task_status.started()
    if interval is None or _address() is None:
        return
    while True:
        await notify("WATCHDOG=1")
        await trio.sleep(interval)


async def ready(status: str = "") -> None:
    await notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


__all__ = ["notify", "ready", "watchdog", "watchdog_interval"]
