"""The service tells systemd it is ready and keeps the watchdog fed from the Trio loop."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from edgegw import sdnotify


async def test_ready_and_watchdog_pings_reach_the_notify_socket(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # ping every 0.05 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(sdnotify.watchdog)
        await sdnotify.ready("listening")
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    got = []
    while True:
        try:
            got.append(server.recv(100).decode())
        except BlockingIOError:
            break
    server.close()
    assert "READY=1\nSTATUS=listening" in got
    assert got.count("WATCHDOG=1") >= 3


async def test_outside_systemd_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert await sdnotify.notify("READY=1") is False
