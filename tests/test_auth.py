"""Sign-in and roles on the hub (docs/security.md), over real TLS sockets.

Tokens are real JWTs (PyJWT), certificates real (trustme), the hub the whole Hub."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sectools import (
    SECRET,
    Pki,
    feed_lot,
    http,
    hub_config,
    jwt_auth,
    running,
    token,
)
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from edgegw.auth import (
    AuthConfig,
    AuthError,
    FailureLimiter,
    HubSecurity,
    TokenVerifier,
    jwk_json,
    mint,
    parse_ttl,
)
from edgegw.config import ConfigError, build
from edgegw.hub import Dashboard, HubConfig
from edgegw.metrics import Metrics
from edgegw.web import HttpServer, Request

# --------------------------------------------------------------------------- tokens


def verifier(**kw: Any) -> TokenVerifier:
    return TokenVerifier.from_config(build(AuthConfig, {"hs256_secret": SECRET, **kw}))


def test_a_minted_token_carries_user_role_and_lot_scope() -> None:
    p = verifier().verify(mint(SECRET, "alice", "operator", 600, lots=["LOT-A*"]))
    assert (p.user, p.role, p.lots) == ("alice", "operator", ("LOT-A*",))
    assert p.has("viewer") and p.has("operator") and not p.has("admin")
    assert p.sees_lot("LOT-A17") and not p.sees_lot("LOT-B1")
    assert abs(p.expires_at - (time.time() + 600)) < 5


def test_tokens_that_are_refused_say_why() -> None:
    v = verifier()
    with pytest.raises(AuthError, match="expired"):
        v.verify(mint(SECRET, "a", "viewer", 10, now=time.time() - 3600))
    with pytest.raises(AuthError, match="not accepted"):
        v.verify(mint("another-secret-that-is-32-chars-long", "a", "viewer", 600))
    unsigned = jwt.encode({"sub": "a", "role": "admin", "exp": time.time() + 60}, None,
                          algorithm="none")
    with pytest.raises(AuthError, match="algorithm 'none'"):
        v.verify(unsigned)
    no_role = jwt.encode({"sub": "a", "exp": time.time() + 60}, SECRET, algorithm="HS256")
    with pytest.raises(AuthError, match="names no role"):
        v.verify(no_role)
    with pytest.raises(AuthError, match="malformed"):
        v.verify("not.a.jwt")


def test_idp_groups_map_to_roles_and_the_highest_wins() -> None:
    v = verifier(role_claim="groups", role_map={"ate-eng": "operator", "it": "admin"})
    claims = {"sub": "bob", "groups": ["staff", "ate-eng"], "exp": time.time() + 60}
    assert v.verify(jwt.encode(claims, SECRET, algorithm="HS256")).role == "operator"
    claims["groups"].append("it")
    assert v.verify(jwt.encode(claims, SECRET, algorithm="HS256")).role == "admin"


def test_rs256_public_key_file_and_es256_jwks_file(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "rsa.pub"
    pem.write_bytes(rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk_json(ec_key.public_key(), "k1")]}))
    v = TokenVerifier.from_config(build(AuthConfig, {
        "public_key_file": str(pem), "jwks_file": str(jwks), "issuer": "https://idp",
        "audience": "edgegw"}))
    claims = {"sub": "carol", "role": "viewer", "exp": time.time() + 60,
              "iss": "https://idp", "aud": "edgegw"}
    assert v.verify(jwt.encode(claims, rsa_key, algorithm="RS256")).user == "carol"
    assert v.verify(jwt.encode(claims, ec_key, algorithm="ES256",
                               headers={"kid": "k1"})).user == "carol"
    with pytest.raises(AuthError):  # an HS256 token where only public keys are configured
        v.verify(mint(SECRET, "x", "admin", 60))
    with pytest.raises(AuthError, match="not accepted"):
        v.verify(jwt.encode({**claims, "aud": "other"}, rsa_key, algorithm="RS256"))


def test_ttl_parsing() -> None:
    assert [parse_ttl(t) for t in ("90s", "30m", "8h", "7d", "120")] == [
        90, 1800, 8 * 3600, 7 * 86400, 120]
    with pytest.raises(ValueError):
        parse_ttl("soon")


def test_failed_handshakes_are_limited_per_address() -> None:
    lim = FailureLimiter(burst=3, per_minute=6)  # one more try every 10 s
    for _ in range(3):
        assert lim.blocked("10.0.0.9", 0.0) is None
        lim.failed("10.0.0.9", 0.0)
    assert lim.blocked("10.0.0.9", 0.0) == 10.0
    assert lim.blocked("10.0.0.8", 0.0) is None  # another address is not affected
    assert lim.blocked("10.0.0.9", 10.0) is None  # refilled one
    assert lim.blocked("10.0.0.9", 60.0) is None and len(lim) == 0  # full again: forgotten


async def test_a_guesser_cannot_take_a_new_bucket_with_each_ipv6_address_of_its_slash_64(
        tmp_path: Path) -> None:
    """A host picks its own IPv6 addresses within its /64 (SLAAC, privacy addresses): the
    hub's handshake limit counts an IPv6 /64 as one address.  Others are not affected."""
    security = HubSecurity(hub_config(tmp_path, gateway_failures_burst=3,
                                      gateway_failures_per_minute=0.01),
                           HttpServer(), Metrics())

    def from_(remote: str) -> Request:
        return Request("GET", "/ws/gateway", {}, {}, remote=remote)

    for i in range(3):  # a new address, and port, at every try
        assert security.gateway_limited(from_(f"2001:db8:1:2::{i + 1:x}:4000{i}")) is None
        security.gateway_failed(from_(f"2001:db8:1:2::{i + 1:x}:4000{i}"))
    limited = security.gateway_limited(from_("2001:db8:1:2:aaaa:bbbb:cccc:dddd:50000"))
    assert limited is not None and limited.status == 429
    assert security.gateway_limited(from_("2001:db8:1:3::1:40000")) is None  # another /64
    assert security.gateway_limited(from_("10.0.0.9:40000")) is None
    for _ in range(3):  # IPv4: per address, as before; a mapped one is the same address
        security.gateway_failed(from_("::ffff:10.0.0.7:40000"))
    assert security.gateway_limited(from_("10.0.0.7:40001")) is not None
    assert security.gateway_limited(from_("10.0.0.8:40001")) is None


def test_auth_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="needs hs256_secret"):
        build(HubConfig, {"auth": {"mode": "jwt"}})
    with pytest.raises(ConfigError, match="at least 32"):
        build(HubConfig, {"auth": {"hs256_secret": "short"}})
    with pytest.raises(ConfigError, match="trusted_proxies"):
        build(HubConfig, {"auth": {"hs256_secret": SECRET, "proxy_header": "X-Token"}})
    with pytest.raises(ConfigError, match="exactly one of token and token_sha256"):
        build(HubConfig, {"gateways": {"g": {}}})


# --------------------------------------------------------------------------- secure by default


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgegw", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_a_reachable_hub_without_auth_does_not_start(tmp_path: Path) -> None:
    cfg = tmp_path / "hub.toml"
    cfg.write_text(f'[hub]\nlisten = "0.0.0.0"\nport = 0\ndata_dir = "{tmp_path}/d"\n')
    out = run_cli("hub", "--config", str(cfg))
    assert out.returncode == 3
    assert out.stderr.strip().splitlines() == [
        "edgegw: cannot start: hub.listen: '0.0.0.0' is reachable from other hosts but the "
        "config has no [auth] section: configure sign-in (docs/security.md) or write "
        "auth.mode = \"none\" to run it open on purpose"]


def test_check_config_says_a_reachable_hub_without_auth_will_not_start(tmp_path: Path) -> None:
    cfg = tmp_path / "hub.toml"
    cfg.write_text('[hub]\nlisten = "0.0.0.0"\n')
    out = run_cli("check-config", str(cfg))
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "ok"
    assert out.stderr.startswith("warning: edgegw hub will not start: hub.listen: '0.0.0.0' ")
    cfg.write_text('[hub]\nlisten = "0.0.0.0"\n[auth]\nmode = "none"\n')
    assert run_cli("check-config", str(cfg)).stderr == ""


async def test_auth_none_on_purpose_warns_at_start_and_on_healthz(tmp_path: Path,
                                                                    caplog: Any) -> None:
    cfg = hub_config(tmp_path, auth={"mode": "none"}, listen="0.0.0.0")
    async with running(cfg) as app:
        reply = await http(app.ingest.port, "GET", "/healthz")
        assert reply.status == 200
        assert reply.json()["auth"] == "none"
        assert any("open to anyone" in w for w in reply.json()["warnings"])
        assert (await http(app.ingest.port, "GET", "/api/lots")).status == 200
    assert any("auth.mode is \"none\"" in r.getMessage() for r in caplog.records)


def test_edgegw_token_mints_from_the_hub_config(tmp_path: Path) -> None:
    cfg = tmp_path / "hub.toml"
    cfg.write_text(f'[auth]\nhs256_secret = "{SECRET}"\n')
    out = run_cli("token", "--config", str(cfg), "--user", "alice", "--role", "operator",
                  "--ttl", "8h")
    assert out.returncode == 0, out.stderr
    p = verifier().verify(out.stdout.strip())
    assert (p.user, p.role) == ("alice", "operator")
    assert 8 * 3600 - 60 < p.expires_at - time.time() <= 8 * 3600


# --------------------------------------------------------------------------- over TLS


async def test_without_a_token_only_health_and_the_sign_in_page(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    ctx = pki.client_context()
    async with running(hub_config(tmp_path, pki, jwt_auth())) as app:
        port = app.ingest.port
        assert (await http(port, "GET", "/healthz", ctx=ctx)).status == 200
        login = await http(port, "GET", "/login", ctx=ctx)
        assert login.status == 200 and b"Sign in" in login.body
        for path in ("/api/lots", "/api/alerts", "/api/stats", "/metrics", "/static/app.js"):
            reply = await http(port, "GET", path, ctx=ctx)
            assert reply.status == 401, (path, reply)
            assert "sign-in required" in reply.json()["error"]
        page = await http(port, "GET", "/", ctx=ctx, headers={"accept": "text/html"})
        assert page.status == 303 and page.headers["location"] == "/login?next=/"
        bad = await http(port, "GET", "/api/lots", ctx=ctx, bearer="x.y.z")
        assert bad.status == 401 and "malformed" in bad.json()["error"]


async def test_a_viewer_can_read_but_not_acknowledge(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    ctx = pki.client_context()
    async with running(hub_config(tmp_path, pki, jwt_auth())) as app:
        port = app.ingest.port
        alert_id = feed_lot(app, "LOT-A1")
        viewer = token("viewer", "vic")
        lots = await http(port, "GET", "/api/lots", ctx=ctx, bearer=viewer)
        assert lots.status == 200 and [r["lot_id"] for r in lots.json()["lots"]] == ["LOT-A1"]
        alerts = await http(port, "GET", "/api/alerts", ctx=ctx, bearer=viewer)
        assert [a["id"] for a in alerts.json()["alerts"]] == [alert_id]
        refused = await http(port, "POST", f"/api/alerts/{alert_id}/ack", ctx=ctx,
                             bearer=viewer, body={})
        assert refused.status == 403 and "needs operator" in refused.json()["error"]
        assert not app.alerts.engine.alerts[alert_id].acknowledged
        for path in ("/api/stats", "/metrics"):  # admin only
            assert (await http(port, "GET", path, ctx=ctx, bearer=viewer)).status == 403
        operator = token("operator", "olga")
        acked = await http(port, "POST", f"/api/alerts/{alert_id}/ack", ctx=ctx,
                           bearer=operator, body={"user": "anonymous-attacker"})
        assert acked.status == 200
        assert acked.json()["alert"]["acked_by"] == "olga"  # from the token, not the body
        admin = token("admin", "root")
        assert (await http(port, "GET", "/api/stats", ctx=ctx, bearer=admin)).status == 200
        metrics = await http(port, "GET", "/metrics", ctx=ctx, bearer=admin)
        assert metrics.status == 200 and b'hub_requests_denied_total{reason="role"}' in (
            metrics.body)


async def test_metrics_take_their_own_bearer_token(tmp_path: Path) -> None:
    import hashlib

    digest = hashlib.sha256(b"prom-token").hexdigest()
    cfg = hub_config(tmp_path, auth=jwt_auth(metrics_token_sha256=digest))
    async with running(cfg) as app:
        port = app.ingest.port
        assert (await http(port, "GET", "/metrics", bearer="prom-token")).status == 200
        assert (await http(port, "GET", "/metrics", bearer="wrong")).status == 401
        # the metrics token opens /metrics only
        assert (await http(port, "GET", "/api/lots", bearer="prom-token")).status == 401


async def test_cross_origin_ack_is_refused(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    ctx = pki.client_context()
    cfg = hub_config(tmp_path, pki, jwt_auth(allowed_origins=["https://ops.example:8443"]))
    async with running(cfg) as app:
        port = app.ingest.port
        alert_id = feed_lot(app, "LOT-A1")
        operator = token("operator", "olga")
        path = f"/api/alerts/{alert_id}/ack"
        evil = await http(port, "POST", path, ctx=ctx, bearer=operator, body={},
                          headers={"origin": "http://evil.example"})
        assert evil.status == 403 and "cross-site" in evil.json()["error"]
        plain = await http(port, "POST", path, ctx=ctx, bearer=operator, body=b"{}",
                           content_type="text/plain")
        assert plain.status == 415
        # plain http origin of the same host: not the same origin as this https hub
        downgraded = await http(port, "POST", path, ctx=ctx, bearer=operator, body={},
                                headers={"origin": f"http://127.0.0.1:{port}"})
        assert downgraded.status == 403
        assert not app.alerts.engine.alerts[alert_id].acknowledged
        for origin in (f"https://127.0.0.1:{port}", "https://ops.example:8443"):
            ok = await http(port, "POST", path, ctx=ctx, bearer=operator, body={},
                            headers={"origin": origin})
            assert ok.status == 200, (origin, ok)


async def test_cross_origin_ack_is_refused_even_without_sign_in(tmp_path: Path) -> None:
    """The issue's attack on a loopback hub without [auth]: a page on another site posting
    text/plain.  Both the Origin and the content type stop it."""
    async with running(hub_config(tmp_path)) as app:
        port = app.ingest.port
        alert_id = feed_lot(app, "LOT-A1")
        path = f"/api/alerts/{alert_id}/ack"
        body = json.dumps({"user": "anonymous-attacker"}).encode()
        attack = await http(port, "POST", path, body=body, content_type="text/plain",
                            headers={"origin": "http://evil.example"})
        assert attack.status == 403
        simple = await http(port, "POST", path, body=body, content_type="text/plain")
        assert simple.status == 415
        assert not app.alerts.engine.alerts[alert_id].acknowledged
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/live",
                                          extra_headers=[(b"origin", b"http://evil.example")]):
                pass
        assert rejected.value.status_code == 403


async def test_an_ack_by_a_name_that_is_not_unicode_is_refused_the_alert_feed_runs_on(
        tmp_path: Path) -> None:
    """``{"user": "op\\udce9"}`` is valid JSON and no Unicode.  It was taken: the alert held
    a name no CBOR frame can carry, and its live topic failed to encode at every tick for
    every CBOR dashboard (an internal error each time) for as long as the alert lived."""
    import cbor2

    from edgegw.metrics import internal_errors

    async with running(hub_config(tmp_path)) as app:
        port = app.ingest.port
        alert_id = feed_lot(app, "LOT-A1")
        path = f"/api/alerts/{alert_id}/ack"
        refused = await http(port, "POST", path, body=b'{"user": "op\\udce9"}')
        assert refused.status == 400 and "lone surrogate" in refused.json()["error"]
        assert not app.alerts.engine.alerts[alert_id].acknowledged
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/live") as ws:
            await ws.send_message(cbor2.dumps({"type": "subscribe", "id": 1,
                                               "topics": ["alert/#"]}))
            acked = await http(port, "POST", path, body={"user": "op\u00e9"})
            assert acked.status == 200
            with trio.fail_after(10):
                while True:  # the acknowledgement reaches the dashboard
                    items = cbor2.loads(await ws.get_message()).get("items", [])
                    if any("op\u00e9" in repr(item) for item in items):
                        break
        assert internal_errors(app.metrics).total() == 0


async def test_a_hub_without_sign_in_cannot_be_reached_through_dns_rebinding(
        tmp_path: Path) -> None:
    """A page on rebind.attacker.example points its own name at the hub's address: the
    browser then sends Host and Origin of the attacker's name, and the Origin check sees a
    same-origin request.  A hub without sign-in answers only Host names that no outside DNS
    answers for: IP addresses, dotless names (localhost), the hosts of auth.allowed_origins."""
    async with running(hub_config(tmp_path)) as app:
        port = app.ingest.port
        alert_id = feed_lot(app, "LOT-A1")
        evil = f"rebind.attacker.example:{port}"
        path = f"/api/alerts/{alert_id}/ack"
        read = await http(port, "GET", "/api/lots", headers={"host": evil})
        assert read.status == 403 and "Host" in read.json()["error"]
        ack = await http(port, "POST", path, body={}, headers={
            "host": evil, "origin": f"http://{evil}"})
        assert ack.status == 403
        assert not app.alerts.engine.alerts[alert_id].acknowledged
        upgrade = await http(port, "GET", "/ws/live", headers={
            "host": evil, "origin": f"http://{evil}", "upgrade": "websocket",
            "connection": "Upgrade", "sec-websocket-version": "13",
            "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="})
        assert upgrade.status == 403
        # health and the gateway endpoint stay open; an address or localhost is served
        assert (await http(port, "GET", "/healthz", headers={"host": evil})).status == 200
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.0.0.1",
                     "hub"):
            assert (await http(port, "GET", "/api/lots", headers={"host": host})).status == 200
    named = hub_config(tmp_path, auth={"mode": "none",
                                       "allowed_origins": ["http://hub.fab.example:8765"]})
    async with running(named) as app:
        port = app.ingest.port
        ok = await http(port, "GET", "/api/lots", headers={"host": "hub.fab.example:8765"})
        assert ok.status == 200
        other = await http(port, "GET", "/api/lots", headers={"host": "evil.example"})
        assert other.status == 403


async def test_a_refused_request_cannot_forge_or_garble_a_log_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The path is percent-decoded: %0A is a newline, %1B an escape.  Logged as it is, a
    refused request's path would start a log line of its own (a forged entry in journald)
    or drive the terminal of whoever reads the log.  Refusals quote it."""
    caplog.set_level(logging.INFO)
    forged = "/api/x%0A2026-12-02%2012:00:00,000%20WARNING%20edgegw.hub:%20forged%1B[2J"
    async with running(hub_config(tmp_path)) as app:
        port = app.ingest.port
        cross_site = await http(port, "POST", forged, body={},
                                headers={"origin": "http://evil.example"})
        assert cross_site.status == 403
        rebound = await http(port, "GET", forged, headers={"host": "evil.example"})
        assert rebound.status == 403
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refusals) == 2
    for line in refusals:
        assert "forged" in line and "\n" not in line and "\x1b" not in line, line


async def test_no_other_site_may_frame_the_dashboard(tmp_path: Path) -> None:
    """Clickjacking: a page on another site framing the dashboard under a decoy to get its
    Acknowledge button clicked.  The browser refuses to frame what says it may not be."""
    async with running(hub_config(tmp_path)) as app:
        for path in ("/", "/static/app.js", "/login"):
            reply = await http(app.ingest.port, "GET", path)
            assert reply.status == 200, path
            assert reply.headers["x-frame-options"] == "DENY", path
            assert "frame-ancestors 'none'" in reply.headers["content-security-policy"], path


async def test_the_static_route_serves_only_the_files_of_its_own_directory(
        tmp_path: Path) -> None:
    """Path traversal on /static/<file>: a name that climbs out, an absolute path, a
    symbolic link to a file elsewhere (the hub's config, with its secrets), and a name with
    a drive (on Windows "c:hub.toml" is a path on drive C:) are all 404."""
    static = tmp_path / "static"
    static.mkdir()
    (static / "app.js").write_text("'use strict';")
    config = tmp_path / "hub.toml"
    config.write_text(f'[auth]\nhs256_secret = "{SECRET}"\n')
    (static / "config.js").symlink_to(config)
    (static / "c:hub.toml").write_text(config.read_text())  # what "C:hub.toml" is on Windows
    dashboard = Dashboard(static)

    async def get(name: str) -> int:
        return (await dashboard.static(Request("GET", "/static/" + name, {}, {}))).status

    assert await get("app.js") == 200
    for name in ("config.js", "c:hub.toml", "..", "../hub.toml", "/etc/passwd", "..\\hub.toml",
                 ".hidden", ""):
        assert await get(name) == 404, name


async def test_sign_in_sets_an_http_only_strict_cookie(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    ctx = pki.client_context()
    async with running(hub_config(tmp_path, pki, jwt_auth())) as app:
        port = app.ingest.port
        viewer = token("viewer", "vic", ttl=600)
        bad = await http(port, "POST", "/login", ctx=ctx, body={"token": "nope"})
        assert bad.status == 401
        ok = await http(port, "POST", "/login", ctx=ctx, body={"token": viewer})
        assert ok.status == 200 and ok.json()["user"] == "vic"
        cookie = ok.headers["set-cookie"]
        attrs = [a.strip() for a in cookie.split(";")]
        assert attrs[0] == f"edgegw_session={viewer}"
        assert {"HttpOnly", "SameSite=Strict", "Secure", "Path=/"} <= set(attrs)
        max_age = int(next(a for a in attrs if a.startswith("Max-Age="))[8:])
        assert 500 < max_age <= 600  # no longer than the token
        lots = await http(port, "GET", "/api/lots", ctx=ctx, headers={"cookie": attrs[0]})
        assert lots.status == 200
        out = await http(port, "POST", "/logout", ctx=ctx, body={})
        assert "Max-Age=0" in out.headers["set-cookie"]


async def test_sso_proxy_header_is_trusted_only_from_the_proxy(tmp_path: Path) -> None:
    auth = jwt_auth(proxy_header="X-Forwarded-Access-Token", trusted_proxies=["127.0.0.0/8"])
    async with running(hub_config(tmp_path, auth=auth)) as app:
        reply = await http(app.ingest.port, "GET", "/api/lots",
                           headers={"x-forwarded-access-token": token("viewer")})
        assert reply.status == 200
    auth["trusted_proxies"] = ["10.9.9.9"]
    async with running(hub_config(tmp_path, auth=auth)) as app:
        reply = await http(app.ingest.port, "GET", "/api/lots",
                           headers={"x-forwarded-access-token": token("viewer")})
        assert reply.status == 401


# --------------------------------------------------------------------------- /ws/live


async def live(port: int, ctx: Any, bearer: str | None, origin: str | None = None) -> Any:
    headers = []
    if bearer is not None:
        headers.append((b"authorization", f"Bearer {bearer}".encode()))
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    return open_websocket_url(f"wss://127.0.0.1:{port}/ws/live", ctx,
                              subprotocols=["edgegw.live.v1.json"], extra_headers=headers)


async def next_of(ws: Any, kind: str) -> dict[str, Any]:
    with trio.fail_after(30):
        while True:
            msg = json.loads(await ws.get_message())
            for item in msg.get("items", [msg]) if msg.get("type") == "batch" else [msg]:
                if item.get("type") == kind:
                    return item


async def test_live_needs_a_token_and_closes_when_it_expires(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    ctx = pki.client_context()
    async with running(hub_config(tmp_path, pki, jwt_auth(leeway_s=0))) as app:
        port = app.ingest.port
        with pytest.raises(ConnectionRejected) as rejected:
            async with await live(port, ctx, None):
                pass
        assert rejected.value.status_code == 401
        with pytest.raises(ConnectionRejected) as rejected:
            async with await live(port, ctx, token("viewer"), origin="http://evil.example"):
                pass
        assert rejected.value.status_code == 403
        short = mint(SECRET, "vic", "viewer", 8)  # long enough to connect under load
        async with await live(port, ctx, short) as ws:
            await next_of(ws, "hello")
            with trio.fail_after(30), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
        assert closed.value.reason.code == 4401
        assert closed.value.reason.reason == "token expired"
        assert app.metrics.as_dict()["live_token_expired_total"] == 1


async def test_live_ack_needs_an_operator_and_is_in_the_tokens_name(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    ctx = pki.client_context()
    async with running(hub_config(tmp_path, pki, jwt_auth())) as app:
        port = app.ingest.port
        alert_id = feed_lot(app, "LOT-A1")
        async with await live(port, ctx, token("viewer", "vic")) as ws:
            await ws.send_message(json.dumps({"type": "ack", "id": 1, "alert": alert_id,
                                              "by": "vic"}))
            error = await next_of(ws, "error")
            assert error["code"] == "forbidden"
        assert not app.alerts.engine.alerts[alert_id].acknowledged
        async with await live(port, ctx, token("operator", "olga")) as ws:
            await ws.send_message(json.dumps({"type": "ack", "id": 2, "alert": alert_id,
                                              "by": "anonymous-attacker"}))
            acked = await next_of(ws, "acked")
            assert acked["by"] == "olga"
        assert app.alerts.engine.alerts[alert_id].acked_by == "olga"


async def test_a_lot_scoped_viewer_never_sees_other_lots(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    ctx = pki.client_context()
    async with running(hub_config(tmp_path, pki, jwt_auth())) as app:
        port = app.ingest.port
        feed_lot(app, "LOT-A1", rid=1)
        b_alert = feed_lot(app, "LOT-B1", rid=100)
        scoped = token("operator", "sam", lots=["LOT-A*"])
        lots = await http(port, "GET", "/api/lots", ctx=ctx, bearer=scoped)
        assert [r["lot_id"] for r in lots.json()["lots"]] == ["LOT-A1"]
        for path in ("/api/lots/LOT-B1/wafers", "/api/lots/LOT-B1/wafers/LOT-B1-W1",
                     "/api/tests/LOT-B1/300"):
            reply = await http(port, "GET", path, ctx=ctx, bearer=scoped)
            assert reply.status == 404 and "LOT-B1" in reply.json()["error"], path
        assert (await http(port, "GET", "/api/lots/LOT-A1/wafers", ctx=ctx,
                           bearer=scoped)).status == 200
        # ids holding "/" are one path segment each (%2F), for the guard as for the API
        feed_lot(app, "LOT-A/2", rid=200)
        feed_lot(app, "LOT-B/2", rid=250)
        assert (await http(port, "GET", "/api/lots/LOT-A%2F2/wafers", ctx=ctx,
                           bearer=scoped)).status == 200
        for path in ("/api/lots/LOT-B%2F2/wafers", "/api/tests/LOT-B%2F2/300"):
            reply = await http(port, "GET", path, ctx=ctx, bearer=scoped)
            assert reply.status == 404 and "LOT-B/2" in reply.json()["error"], path
        alerts = (await http(port, "GET", "/api/alerts", ctx=ctx, bearer=scoped)).json()
        assert {a["context"]["lot_id"] for a in alerts["alerts"]} == {"LOT-A1", "LOT-A/2"}
        ack_b = await http(port, "POST", f"/api/alerts/{b_alert}/ack", ctx=ctx, bearer=scoped,
                           body={})
        assert ack_b.status == 404
        # /ws/live: everything subscribed, only LOT-A topics arrive (snapshots and deltas)
        async with await live(port, ctx, scoped) as ws:
            await ws.send_message(json.dumps({"type": "subscribe", "id": 1, "topics": ["#"]}))
            seen: set[str] = set()
            fed = False
            with trio.move_on_after(5):  # a few ticks' worth of snapshots and deltas
                while True:
                    msg = json.loads(await ws.get_message())
                    for item in msg.get("items", []):
                        seen.add(item.get("topic", ""))
                    if len(seen) >= 3 and msg.get("type") == "batch" and not fed:
                        # after the subscription: new deltas for B, and two new lots whose
                        # topics the subscription matches as they appear
                        feed_lot(app, "LOT-B1", rid=300)
                        feed_lot(app, "LOT-C1", rid=400)
                        feed_lot(app, "LOT-A2", rid=500)
                        fed = True
            assert any(t.startswith("lot/LOT-A1") for t in seen), seen
            assert any(t.startswith("lot/LOT-A2") for t in seen), seen  # a new lot in scope
            assert not [t for t in seen if "LOT-B1" in t or "LOT-C1" in t
                        or t.startswith("alert/")], seen


async def test_a_bug_in_the_access_check_refuses_the_request(tmp_path: Path) -> None:
    from edgegw.metrics import internal_errors

    async with running(hub_config(tmp_path, auth=jwt_auth())) as app:
        verifier = app.ingest.security.access.verifier
        assert verifier is not None

        def broken(token: str) -> Any:
            raise RuntimeError("a bug in the verifier")

        verifier.verify = broken  # type: ignore[method-assign]
        reply = await http(app.ingest.port, "GET", "/api/lots", bearer=token("admin"))
        assert reply.status == 500  # fails closed: nothing served unchecked
        assert internal_errors(app.metrics).get(where="http_guard") == 1
        assert (await http(app.ingest.port, "GET", "/healthz")).status == 200
