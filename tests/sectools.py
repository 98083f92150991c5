"""Real certificates (trustme), a whole hub with sign-in, and a small HTTP(S) client."""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import trio
import trustme

from edgegw.auth import mint
from edgegw.config import build
from edgegw.hub import Hub, HubConfig

SECRET = "a-test-secret-of-at-least-32-characters!"
GATEWAY_TOKEN = "s3cret-gateway-token"


class Pki:
    """A CA, the hub's certificate for 127.0.0.1/localhost, and client certificates."""

    def __init__(self, directory: Path, ca: trustme.CA | None = None) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = ca or trustme.CA()
        self.ca_file = str(directory / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        self.cert_file, self.key_file = self.issue("hub", "127.0.0.1", "localhost")

    def issue(self, name: str, *identities: str) -> tuple[str, str]:
        """A certificate for ``identities`` (its CN is the first), as (cert, key) files."""
        cert = self.ca.issue_cert(*identities, common_name=identities[0])
        cert_path, key_path = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_path))
        cert.private_key_pem.write_to_path(str(key_path))
        return str(cert_path), str(key_path)

    def client_context(self, cert: tuple[str, str] | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if cert is not None:
            ctx.load_cert_chain(*cert)
        return ctx


def token(role: str, user: str = "alice", ttl: float = 3600, **kw: Any) -> str:
    return mint(SECRET, user, role, ttl, **kw)


def hub_config(tmp: Path, pki: Pki | None = None, auth: dict[str, Any] | None = None,
               tls: dict[str, Any] | None = None, **hub: Any) -> HubConfig:
    data: dict[str, Any] = {
        "hub": {"port": 0, "data_dir": str(tmp / "hub"), **hub},
        "gateways": {"ate-01": {"token": GATEWAY_TOKEN}},
        "alerts": {"rules": [{"name": "wafer-yield", "kind": "wafer_yield", "priority": "P0",
                              "threshold": 0.8, "min_parts": 4}]},
    }
    if auth is not None:
        data["auth"] = auth
    if pki is not None:
        data["tls"] = {"cert_file": pki.cert_file, "key_file": pki.key_file, **(tls or {})}
    return build(HubConfig, data)


def jwt_auth(**extra: Any) -> dict[str, Any]:
    return {"mode": "jwt", "hs256_secret": SECRET, **extra}


@contextlib.asynccontextmanager
async def running(config: HubConfig) -> AsyncIterator[Hub]:
    app = Hub(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(app.run)
        try:
            yield app
        finally:
            nursery.cancel_scope.cancel()


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.body[:200]!r}>"


async def open_stream(port: int, ctx: ssl.SSLContext | None) -> trio.abc.Stream:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    if ctx is None:
        return tcp
    stream = trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1", https_compatible=True)
    await stream.do_handshake()
    return stream


async def http(port: int, method: str, path: str, *, ctx: ssl.SSLContext | None = None,
               headers: dict[str, str] | None = None, body: Any = None,
               content_type: str = "application/json", bearer: str | None = None) -> Reply:
    """One request on a new connection (TLS with ``ctx``)."""
    data = b"" if body is None else (body if isinstance(body, bytes) else
                                     json.dumps(body).encode())
    hdrs = {"host": f"127.0.0.1:{port}", "connection": "close", **(headers or {})}
    if bearer is not None:
        hdrs["authorization"] = f"Bearer {bearer}"
    if method != "GET":
        hdrs.setdefault("content-type", content_type)
        hdrs["content-length"] = str(len(data))
    conn = h11.Connection(h11.CLIENT)
    with trio.fail_after(30):
        stream = await open_stream(port, ctx)
        async with stream:
            out = conn.send(h11.Request(method=method, target=path, headers=list(hdrs.items())))
            out += conn.send(h11.Data(data=data)) if data else b""
            out += conn.send(h11.EndOfMessage())
            await stream.send_all(out)
            status, got, chunks = 0, {}, []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    got = {k.decode().lower(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return Reply(status, got, b"".join(chunks))


def lot_records(lot: str, wafer: str, n: int, good_every: int = 4, ts: float = 100.0,
                ) -> list[Any]:
    """A lot of ``n`` parts on one wafer, one in ``good_every`` good (a low yield raises the
    ``wafer-yield`` alert of ``hub_config``)."""
    from edgegw.records import LotEnd, LotStart, ParametricResult, PartResult, WaferEnd

    out: list[Any] = [LotStart("t", ts, lot, "PT-1", "node", "T", "job", 0)]
    for i in range(n):
        hb = 1 if i % good_every == 0 else 4
        out.append(ParametricResult("t", ts + i, lot, 1, i % 2, str(i), 300, "VOUT", 1.0 + i,
                                    0.0, 100.0, "V", True))
        out.append(PartResult("t", ts + i, lot, wafer, 1, i % 2, str(i), i, 0, hb, hb, hb == 1))
    out.append(WaferEnd("t", ts + n, lot, wafer, 1, 0, n, None))
    out.append(LotEnd("t", ts + n, lot, 0))
    return out


def feed_lot(app: Hub, lot: str, rid: int = 1) -> str:
    """Apply a low-yield lot to the live state; the id of the alert it raised."""
    app.state.on_records("ate-01", rid, lot_records(lot, f"{lot}-W1", 8), now=1000.0)
    ids = [a.id for a in app.alerts.engine.alerts.values()
           if a.context.get("lot_id") == lot]
    assert ids, "the low-yield lot raised no alert"
    return ids[-1]
