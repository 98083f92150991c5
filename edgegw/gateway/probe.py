"""The uplink's readiness probe: is the hub reachable, and does it want us now?

A probe is a plain HTTP ``GET`` of the gateway endpoint's path (``/ws/gateway``) without
an upgrade (docs/protocol.md section 7).  The hub answers ``200`` when it would take a
handshake and ``503`` with ``Retry-After`` when it is shedding load.  It is cheap for
both ends — no WebSocket, no HELLO — and a hub that is down or cut off sees nothing of it.

Outcomes:

- ``ready``: 200.  Go ahead with the handshake.
- ``busy``: 503; ``retry_after`` is the hub's hint (seconds), if it gave one.
- ``answered``: any other HTTP answer (a wrong URL, a proxy's error page): the hub's
  host is reachable, the handshake will tell what is wrong.
- ``silent``: the TCP connection was accepted but no answer came within the timeout — an
  overloaded hub, or a middlebox that swallows traffic.  Treated as a failure at the hub
  (exponential backoff), so an overloaded hub is not probed harder.
- ``unreachable``: no TCP connection (refused, no route, the connect timed out) or
  closed without an answer.  Nothing of the hub's was spent: probe again soon.

``probe_until_reached`` staggers probes: a new one starts every ``next_delay()`` seconds
while earlier ones may still be waiting for their connect, so a SYN lost in a black hole
(the kernel only retries it after 1 s, then 3 s) does not hold up noticing the link's
return by a whole probe timeout.
"""

from __future__ import annotations

import dataclasses
import math
import ssl
import urllib.parse
from collections.abc import Callable

import h11
import trio

MAX_IN_FLIGHT = 4  # staggered probes waiting at once, at most


@dataclasses.dataclass(frozen=True)
class ProbeTarget:
    host: str
    port: int
    path: str
    ssl_context: ssl.SSLContext | None = None

    @classmethod
    def from_url(cls, url: str, ssl_context: ssl.SSLContext | None = None) -> ProbeTarget:
        """The hub's WebSocket URL (``ws://`` or ``wss://``) as a probe target."""
        parts = urllib.parse.urlsplit(url)
        secure = parts.scheme in ("wss", "https")
        if not parts.hostname:
            raise ValueError(f"no host in hub URL {url!r}")
        return cls(parts.hostname, parts.port or (443 if secure else 80), parts.path or "/",
                   ssl_context if secure else None)

    @property
    def host_header(self) -> str:
        default = 443 if self.ssl_context else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    # "ready" | "busy" | "answered" | "tls_refused" | "silent" | "unreachable"
    outcome: str
    detail: str
    retry_after: float | None = None

    @property
    def reached(self) -> bool:
        return self.outcome != "unreachable"


def retry_after_seconds(value: bytes | None) -> float | None:
    """``Retry-After`` in its delay-seconds form (RFC 9110 10.2.3); None if absent/other."""
    if not value:
        return None
    try:
        seconds = float(value.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


async def probe_once(target: ProbeTarget, within_s: float) -> ProbeResult:
    """One probe, at most ``within_s`` seconds long."""
    connected = False
    with trio.move_on_after(within_s):
        try:
            tcp = await trio.open_tcp_stream(target.host, target.port)
        except OSError as exc:
            return ProbeResult("unreachable", f"connect: {exc.strerror or exc}")
        connected = True
        stream: trio.abc.Stream = tcp
        async with tcp:
            try:
                if target.ssl_context is not None:
                    stream = trio.SSLStream(tcp, target.ssl_context, server_hostname=target.host,
                                            https_compatible=True)
                    await stream.do_handshake()
                return await _get(stream, target)
            except (trio.BrokenResourceError, OSError) as exc:
                if isinstance(exc.__cause__, ssl.SSLError):
                    # a certificate (the hub's, a pin, or ours) is refused: configuration
                    return ProbeResult("tls_refused", f"TLS: {exc.__cause__}")
                return ProbeResult("unreachable", f"connection lost: {exc}")
            except h11.RemoteProtocolError as exc:
                return ProbeResult("answered", f"not an HTTP answer: {exc}")
    if connected:
        return ProbeResult("silent", f"connected, but no answer within {within_s:g} s")
    return ProbeResult("unreachable", f"no connection within {within_s:g} s")


async def _get(stream: trio.abc.Stream, target: ProbeTarget) -> ProbeResult:
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=target.path, headers=[
        ("host", target.host_header), ("connection", "close"),
        ("user-agent", "edgegw-gateway-probe")])
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(4096)))
        elif isinstance(event, h11.Response):
            headers = dict(event.headers)
            if event.status_code == 200:
                return ProbeResult("ready", "200")
            if event.status_code == 503:
                hint = retry_after_seconds(headers.get(b"retry-after"))
                return ProbeResult("busy", "503 (hub busy)", hint)
            return ProbeResult("answered", f"HTTP {event.status_code} from {target.path}")
        elif isinstance(event, h11.ConnectionClosed):
            return ProbeResult("unreachable", "closed without an answer")
        # h11.InformationalResponse: wait for the final answer


async def probe_until_reached(target: ProbeTarget, within_s: float,
                              next_delay: Callable[[], float],
                              on_result: Callable[[ProbeResult], None] = lambda r: None,
                              ) -> ProbeResult:
    """Probe until one probe reaches something (any outcome but ``unreachable``)."""
    send, receive = trio.open_memory_channel[ProbeResult](math.inf)
    in_flight = trio.Semaphore(MAX_IN_FLIGHT)

    async def one() -> None:
        try:
            send.send_nowait(await probe_once(target, within_s))
        finally:
            in_flight.release()

    async def launcher(nursery: trio.Nursery) -> None:
        while True:
            await in_flight.acquire()
            nursery.start_soon(one)
            await trio.sleep(next_delay())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(launcher, nursery)
        async for result in receive:
            on_result(result)
            if result.reached:
                nursery.cancel_scope.cancel()
                return result
    raise AssertionError("unreachable: the probe channel never closes")
