"""A private Redis for the cluster tests, and a TCP proxy a test can cut.

``redis_server`` (module-scoped fixture): ``redis-server --port <free> --save "" --appendonly
no`` in a temp dir, private to the test module so that a test may stop and restart it (an
empty restart is what "Redis lost its data" looks like).  ``redis_shards``: two of them, the
shards of a sharded bus.  Tests share it with a fresh key
prefix each (``fresh_prefix``).  Skipped (one line) only when the binary is missing and
``CI`` is not ``true``.

``TcpProxy``: a Trio proxy between a node and Redis.  ``cut()`` stops forwarding without
closing anything (a partition: no RST, requests just get no answer); ``restore()`` drops
the connections that were cut and forwards again (the node reconnects).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trio
from ports import free_port


class RedisServer:
    """``args``: more redis-server options; with ``tls`` (a client context trusting its
    certificate) the port is its TLS port and there is no plain one."""

    def __init__(self, port: int, workdir: Path, args: Sequence[str] = (),
                 tls: ssl.SSLContext | None = None) -> None:
        self.port = port
        self.workdir = workdir
        self.args = list(args)
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        ports = ["--port", "0", "--tls-port", str(self.port)] if self.tls else [
            "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [binary, *ports, "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no",
             *self.args],
            stdout=open(self.workdir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        import socket
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
                    s = self.tls.wrap_socket(raw, server_hostname="127.0.0.1") \
                        if self.tls else raw
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # up, with a password
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart_empty(self) -> None:
        """Stop and start again with nothing in it (no persistence is configured)."""
        self.stop()
        self.start()


@contextlib.contextmanager
def private_redis(args: Sequence[str] = (), tls: ssl.SSLContext | None = None
                  ) -> Iterator[RedisServer]:
    """A private redis-server (``RedisServer``: ``args``, ``tls``)."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            raise RuntimeError("redis-server is required under CI (apt-get install redis)")
        pytest.skip("redis-server is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="edgegw-redis-", dir="/var/tmp"
                                    if os.path.isdir("/var/tmp") else None))
    server = RedisServer(free_port(), workdir, args, tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with private_redis() as server:
        yield server


@pytest.fixture(scope="module")
def redis_shards() -> Iterator[list[RedisServer]]:
    """Two private Redis servers: the shards of a sharded cluster bus
    (``[hub.cluster] redis_urls``), each restartable on its own."""
    with private_redis() as first, private_redis() as second:
        yield [first, second]


def fresh_prefix() -> str:
    return f"t{secrets.token_hex(4)}"


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``cut``/``restore`` a partition."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._open = trio.Event()
        self._open.set()
        self._conns: set[trio.CancelScope] = set()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    def cut(self) -> None:
        self._open = trio.Event()

    def restore(self) -> None:
        for scope in list(self._conns):
            scope.cancel()  # the cut connections are dead: their peers reconnect
        self._open.set()

    async def _handle(self, client: trio.SocketStream) -> None:
        gate = self._open
        await gate.wait()  # a connection made while cut waits (its SYN "got lost")
        if gate is not self._open:
            await client.aclose()
            return
        with trio.CancelScope() as scope:
            self._conns.add(scope)
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                await client.aclose()
                return
            try:
                async with client, upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream, gate)
                    nursery.start_soon(self._pump, upstream, client, gate)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self._conns.discard(scope)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream,
                    gate: trio.Event) -> None:
        while True:
            data = await src.receive_some(65536)
            if not data:
                await dst.send_eof() if hasattr(dst, "send_eof") else None
                return
            if not self._open.is_set():
                await trio.sleep_forever()  # cut: the bytes go nowhere, nothing closes
            await dst.send_all(data)
