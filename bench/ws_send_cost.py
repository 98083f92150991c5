"""Per-client send cost of one WebSocket broadcast: the hub's own layer vs hypercorn's ASGI path.

    python bench/ws_send_cost.py [--clients 1000] [--rate 20] [--size 2048] [--seconds 10]
                                 [--servers edgegw-direct edgegw-task hypercorn-task ...]

The question it answers (issue 10, item 6): should the hub serve through hypercorn's Trio
worker instead of its hand-written h11 + wsproto layer?  The one thing the hand-written layer
is for is the ``/ws/live`` fan-out: 1,000 dashboards x 20 frames/s, the same bytes to all.
Each server variant runs in its own process, accepts ``--clients`` WebSocket clients, then
sends one ``--size``-byte binary message to every client ``--rate`` times a second for
``--seconds``; the server's own CPU time over that window, divided by the sends, is the
per-client send cost.  The clients (one epoll loop in this process) count every message, so
a variant that falls behind shows as missing messages, not as a cheap one.

Variants:
* ``edgegw-direct``: the hub's path (edgegw/hub/fanout.py): the message is WebSocket-framed
  once per tick (``prepare_message``) and written with ``os.write`` to each socket from the
  ticker, no task switch per client.
* ``edgegw-task``: the hub's fallback path: framed once, each client's own task woken to
  ``send_prepared`` it (what happens when a socket is full).
* ``edgegw-tls``: the hub's path under TLS (``[tls]``, docs/security.md): framed once, but
  every client's copy is encrypted on its own (TLS cannot share ciphertext) and written by
  its own task -- the direct ``os.write`` is impossible through ``trio.SSLStream``.  Needs
  trustme (the test extra) for the certificate.
* ``hypercorn-task``: hypercorn's Trio worker, the idiomatic ASGI way: a task per connection
  (the ASGI app call) woken each tick to ``await send({"type": "websocket.send", ...})``;
  hypercorn frames it per client through wsproto and writes it under its send lock.
* ``hypercorn-loop``: hypercorn's lower bound: the ticker awaits every connection's ASGI
  ``send`` in turn (no task switch per client; one stuck client would stall all of them, so
  this is not deployable, only a floor).

hypercorn is not a dependency of edgegw: ``pip install 'hypercorn[trio]'`` to run its
variants (they are skipped when it is missing).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import select
import socket
import ssl
import subprocess
import sys
import time
from typing import Any


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------- servers


class Broadcast:
    """Shared by the variants: wait for the clients, then tick and measure."""

    def __init__(self, args: argparse.Namespace) -> None:
        import trio

        self.args = args
        self.payload = bytes(range(256)) * (args.size // 256) + b"x" * (args.size % 256)
        self.all_connected = trio.Event()
        self.count = 0
        self.sends = 0

    def joined(self) -> None:
        self.count += 1
        if self.count >= self.args.clients:
            self.all_connected.set()

    async def run(self, tick: Any) -> None:
        import trio

        await self.all_connected.wait()
        interval = 1.0 / self.args.rate
        ticks = round(self.args.seconds * self.args.rate)
        cpu0, t0 = _cpu(), time.monotonic()
        next_at = trio.current_time()
        for _ in range(ticks):
            await tick()
            next_at += interval
            await trio.sleep_until(next_at)
        await trio.sleep(0.5)  # let task-per-client variants finish their last sends
        cpu, wall = _cpu() - cpu0, time.monotonic() - t0
        print("RESULT " + json.dumps({"cpu_s": cpu, "wall_s": wall, "sends": self.sends,
                                      "ticks": ticks}), flush=True)


def serve_edgegw(args: argparse.Namespace, direct: bool, tls: bool = False) -> None:
    import tempfile

    import trio

    from edgegw.web import HttpServer, Request, WebSocket, prepare_message

    bc = Broadcast(args)

    class Client:
        def __init__(self, ws: WebSocket) -> None:
            self.ws = ws
            self.wake = trio.Event()
            self.frame = b""

    clients: list[Client] = []

    async def handler(ws: WebSocket, request: Request) -> None:
        client = Client(ws)
        clients.append(client)
        bc.joined()

        async def sender() -> None:
            while True:
                await client.wake.wait()
                client.wake = trio.Event()
                await ws.send_prepared(client.frame)
                bc.sends += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            while True:
                await ws.get_message()

    async def tick() -> None:
        frame = prepare_message(bc.payload)  # encode once ...
        for client in clients:  # ... write many
            if direct and client.ws.can_send_nowait():
                if client.ws.send_prepared_nowait(frame) != len(frame):
                    raise RuntimeError("socket full: this bench wants clients that keep up")
                bc.sends += 1
                continue
            client.frame = frame
            client.wake.set()

    async def main() -> None:
        server = HttpServer()
        server.add_ws_route("/ws", handler)
        ca_path = ""
        if tls:
            import trustme

            ca = trustme.CA()
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("127.0.0.1").configure_cert(context)
            server.tls = lambda: context
            ca_path = os.path.join(tempfile.mkdtemp(prefix="ws-send-cost-"), "ca.pem")
            ca.cert_pem.write_to_path(ca_path)
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, "127.0.0.1", 0)
            print(f"PORT {listeners[0].socket.getsockname()[1]} {ca_path}".strip(), flush=True)
            await bc.run(tick)
            nursery.cancel_scope.cancel()

    trio.run(main)


def serve_hypercorn(args: argparse.Namespace, loop: bool) -> None:
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    bc = Broadcast(args)
    sends: list[Any] = []  # each connection's ASGI send callable
    wakes: list[trio.Event] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "websocket":
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        idx = len(sends)
        sends.append(send)
        wakes.append(trio.Event())
        bc.joined()
        if loop:
            while (await receive())["type"] != "websocket.disconnect":
                pass
            return
        async with trio.open_nursery() as nursery:
            async def reader() -> None:
                while (await receive())["type"] != "websocket.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(reader)
            message = {"type": "websocket.send", "bytes": bc.payload}
            while True:
                await wakes[idx].wait()
                wakes[idx] = trio.Event()
                await send(message)
                bc.sends += 1

    async def tick() -> None:
        if loop:
            message = {"type": "websocket.send", "bytes": bc.payload}
            for send in sends:
                await send(message)
                bc.sends += 1
        else:
            for wake in wakes:
                wake.set()

    async def main() -> None:
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.backlog = 4096
        config.accesslog = None
        config.errorlog = None
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(serve, app, config)
            print(f"PORT {binds[0].rsplit(':', 1)[1]}", flush=True)
            await bc.run(tick)
            nursery.cancel_scope.cancel()

    trio.run(main)


# --------------------------------------------------------------------------- clients


def connect(port: int, number: int, ca_path: str = "") -> socket.socket:
    # From 16 loopback addresses, as from many hosts: the hub caps connections per address.
    sock = socket.create_connection(("127.0.0.1", port),
                                    source_address=(f"127.0.0.{1 + number % 16}", 0))
    if ca_path:
        sock = ssl.create_default_context(cafile=ca_path).wrap_socket(
            sock, server_hostname="127.0.0.1")
    key = base64.b64encode(os.urandom(16))
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        raise ConnectionError(head.decode("latin-1"))
    if head.partition(b"\r\n\r\n")[2]:
        raise ConnectionError("unexpected bytes after the handshake")
    sock.setblocking(False)
    return sock


def measure(args: argparse.Namespace, variant: str) -> dict[str, Any] | None:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--role", variant,
                             *sys.argv[1:]], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            return None
        port = int(line.split()[1])
        ca_path = line.split()[2] if len(line.split()) > 2 else ""
        ep = select.epoll()
        socks = {}
        for i in range(args.clients):
            s = connect(port, i, ca_path)
            socks[s.fileno()] = s
            ep.register(s.fileno(), select.EPOLLIN)
        frame_len = args.size + (2 if args.size < 126 else 4 if args.size < 65536 else 10)
        received = dict.fromkeys(socks, 0)
        own0 = _cpu()
        os.set_blocking(proc.stdout.fileno(), False)
        out = ""
        while "RESULT " not in out:
            for fd, _ in ep.poll(0.05):
                sock = socks[fd]
                try:
                    received[fd] += len(sock.recv(1 << 18))
                    while getattr(sock, "pending", lambda: 0)():  # TLS: decrypted, buffered
                        received[fd] += len(sock.recv(1 << 18))
                except (BlockingIOError, ssl.SSLWantReadError):
                    pass
            try:
                out += proc.stdout.read() or ""
            except (BlockingIOError, TypeError):
                pass
            if proc.poll() is not None and "RESULT " not in out:
                out += proc.stdout.read() or ""
                break
        own = _cpu() - own0
        result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
        result["delivered"] = sum(received.values()) / frame_len
        result["clients_cpu_s"] = own
        for s in socks.values():
            s.close()
        return result
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--role", default="main")
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=20.0, help="broadcasts per second")
    ap.add_argument("--size", type=int, default=2048, help="message bytes")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--servers", nargs="+",
                    default=["edgegw-direct", "edgegw-task", "edgegw-tls", "hypercorn-task",
                             "hypercorn-loop"])
    args = ap.parse_args()
    _raise_nofile()
    if args.role == "edgegw-direct":
        serve_edgegw(args, direct=True)
        return 0
    if args.role == "edgegw-task":
        serve_edgegw(args, direct=False)
        return 0
    if args.role == "edgegw-tls":
        serve_edgegw(args, direct=False, tls=True)
        return 0
    if args.role in ("hypercorn-task", "hypercorn-loop"):
        try:
            import hypercorn  # noqa: F401
        except ImportError:
            return 0
        serve_hypercorn(args, loop=args.role == "hypercorn-loop")
        return 0
    print(f"WebSocket broadcast: {args.clients} clients x {args.rate:g} messages/s of "
          f"{args.size} B for {args.seconds:g} s; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    for variant in args.servers:
        r = measure(args, variant)
        if r is None:
            print(f"  {variant:15s} skipped (hypercorn not installed?)")
            continue
        expected = r["ticks"] * args.clients
        print(f"  {variant:15s} {1e6 * r['cpu_s'] / max(r['sends'], 1):6.1f} us per client send, "
              f"server CPU {100 * r['cpu_s'] / r['wall_s']:4.0f} % of one core; "
              f"delivered {r['delivered']:.0f}/{expected} messages "
              f"(wall {r['wall_s']:.1f} s for {args.seconds:g} s of ticks)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
