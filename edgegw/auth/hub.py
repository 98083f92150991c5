"""The hub's protections, assembled from its config and hooked into its HTTP server.

``HubSecurity(config, http, metrics)`` installs the access guard and the sign-in page, the
TLS context (and its SIGHUP reload), and offers the gateway endpoint its checks: the
client certificate bound to the gateway id, the per-address limit on failed handshakes,
tokens compared by hash.  docs/security.md describes each, with its configuration.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import ssl
from typing import TYPE_CHECKING, Any

import trio

from ..metrics import Metrics
from ..peeraddr import bucket_of
from ..startup import StartupError
from ..tls import ServerTls, cert_identities
from ..web import HttpServer, Request, Response
from .access import Access
from .config import AuthConfig
from .ratelimit import FailureLimiter
from .signin import SignIn
from .tokens import AuthError, TokenVerifier

if TYPE_CHECKING:
    from ..hub.config import GatewayAuth, HubConfig

log = logging.getLogger("edgegw.auth")

EXAMPLE_TOKEN_PREFIX = "change-me"
LOG_INTERVAL_S = 10.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def secure_by_default_problem(config: HubConfig) -> str | None:
    """Why the hub must not start as configured (one line), or None."""
    if config.auth is None and not is_loopback(config.hub.listen):
        return (f"hub.listen: {config.hub.listen!r} is reachable from other hosts but the "
                "config has no [auth] section: configure sign-in (docs/security.md) or write "
                "auth.mode = \"none\" to run it open on purpose")
    return None


def token_matches(auth: GatewayAuth, given: str) -> bool:
    """Constant-time comparison with the configured token or its SHA-256."""
    if auth.token_sha256:
        digest = hashlib.sha256(given.encode()).hexdigest()
        return hmac.compare_digest(digest, auth.token_sha256.lower())
    return hmac.compare_digest(auth.token.encode(), given.encode())


def token_digest(token: str) -> str:
    """What a connection keeps of the token it was admitted with: its SHA-256 (hex), so a
    config reload can tell whether the new table still admits it (``digest_matches``)."""
    return hashlib.sha256(token.encode()).hexdigest()


def digest_matches(auth: GatewayAuth, digest: str) -> bool:
    """Whether a token whose ``token_digest`` is ``digest`` matches ``auth``."""
    wanted = auth.token_sha256.lower() if auth.token_sha256 else token_digest(auth.token)
    return hmac.compare_digest(digest, wanted)


class HubSecurity:
    def __init__(self, config: HubConfig, http: HttpServer, metrics: Metrics) -> None:
        problem = secure_by_default_problem(config)
        if problem:
            raise StartupError(problem)
        self.config = config
        auth = config.auth or AuthConfig(mode="none")
        self.auth = auth
        verifier = None
        if auth.mode == "jwt":
            try:
                verifier = TokenVerifier.from_config(auth)
            except ValueError as exc:
                raise StartupError(str(exc)) from None
        self.access = Access(auth, verifier, metrics=metrics)
        http.guard = self.access.check
        SignIn(self.access).install(http)
        tls = config.tls
        self.tls: ServerTls | None = None
        if tls.enabled:
            try:
                self.tls = ServerTls(tls.cert_file, tls.key_file, tls.client_ca_file,
                                     tls.min_version)
            except (OSError, ssl.SSLError) as exc:
                raise StartupError(f"tls.cert_file/key_file/client_ca_file: cannot load: "
                                   f"{getattr(exc, 'strerror', None) or exc}") from None
            http.tls = self.tls
        self.limiter = FailureLimiter(config.hub.gateway_failures_burst,
                                      config.hub.gateway_failures_per_minute)
        self._limited_count = 0
        self._limited_next_log = -math.inf
        self.m_limited = metrics.counter(
            "hub_gateway_handshakes_limited_total",
            "gateway upgrades answered 429: too many failed handshakes from the address")
        self.m_reloads = metrics.counter("hub_tls_reloads_total",
                                         "TLS certificate reloads (SIGHUP), by outcome")
        self.warnings = self._warnings()

    # ------------------------------------------------------------------ start-up

    def _warnings(self) -> list[str]:
        out = []
        if self.config.auth is not None and self.config.auth.mode == "none":
            out.append("auth.mode is \"none\": the dashboard, the API and /ws/live are open "
                       "to anyone who can reach the port")
        if not self.config.gateways:
            out.append("no [gateways] configured: every gateway will be refused")
        for gw, auth in sorted(self.config.gateways.items()):
            if auth.token.startswith(EXAMPLE_TOKEN_PREFIX):
                out.append(f"gateways.{gw}.token is still an example token "
                           f"({EXAMPLE_TOKEN_PREFIX}-...): replace it")
        return out

    def log_warnings(self) -> None:
        for text in self.warnings:
            log.warning("%s", text)

    def health(self) -> dict[str, Any]:
        """What /healthz says about the protections (never a secret)."""
        out: dict[str, Any] = {"auth": self.auth.mode if self.config.auth is not None
                               else "none (loopback only)", "tls": self.tls is not None}
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out

    def use_gateways(self, config: HubConfig) -> None:
        """The running config after a reload took the file's ``[gateways]`` table
        (edgegw/hub/reload.py): the start-up warnings about it are made again."""
        self.config = config
        self.warnings = self._warnings()

    @staticmethod
    async def load_auth(auth: AuthConfig) -> TokenVerifier:
        """The verifier of a reloaded ``[auth]`` (``mode = "jwt"``), its key files read in a
        worker thread; ValueError naming the key that cannot be used."""
        return await trio.to_thread.run_sync(TokenVerifier.from_config, auth)

    def use_auth(self, auth: AuthConfig, verifier: TokenVerifier) -> None:
        """Every request from now on is checked against ``auth`` and its keys (a SIGHUP);
        the connections open already are checked again by ``still_signed_in``."""
        self.auth = auth
        self.access.reconfigure(auth, verifier)

    def still_signed_in(self, request: Request) -> str | None:
        """Why an open connection opened with ``request`` is no longer admitted as it was
        after ``[auth]`` was reloaded (its token is refused by the new keys or claims
        rules, or it maps to another user, role or lot scope) -- a short reason for its
        close frame -- or None.  The details go to the log, never the token."""
        before = request.principal
        if before is None or before.via in ("none", "metrics_token"):
            return None
        try:
            now = self.access.authenticate(request)
        except AuthError as exc:
            log.warning("SIGHUP: /ws/live connection of %r from %s: %s", before.user,
                        request.remote, exc)
            return "token no longer accepted (hub config reloaded)"
        if (now.user, now.role, now.lots) != (before.user, before.role, before.lots):
            log.warning("SIGHUP: /ws/live connection of %r from %s: signed in as %r, %s, "
                        "lots %s now", before.user, request.remote, now.user, now.role,
                        now.lots)
            return "sign-in changed (hub config reloaded)"
        return None

    async def reload_tls(self) -> bool:
        assert self.tls is not None
        ok = await trio.to_thread.run_sync(self.tls.reload)
        self.m_reloads.inc(outcome="ok" if ok else "failed")
        return ok

    # ------------------------------------------------------------------ gateways

    def gateway_limited(self, request: Request) -> Response | None:
        """429 for an address that has used up its failed handshakes."""
        address = bucket_of(request.remote)
        wait = self.limiter.blocked(address, trio.current_time())
        if wait is None:
            return None
        self.m_limited.inc()
        self._limited_count += 1
        now = trio.current_time()
        if now >= self._limited_next_log:
            log.warning("gateway endpoint: %d upgrade(s) refused in %g s after too many failed "
                        "handshakes (last from %s)", self._limited_count, LOG_INTERVAL_S,
                        address)
            self._limited_count = 0
            self._limited_next_log = now + LOG_INTERVAL_S
        return Response(429, b'{"error":"too many failed handshakes from this address"}',
                        headers=[("retry-after", f"{max(1, math.ceil(wait))}")])

    def gateway_failed(self, request: Request) -> None:
        self.limiter.failed(bucket_of(request.remote), trio.current_time())

    def gateway_cert_problem(self, request: Request, gateway_id: str) -> str | None:
        """Why the connection's client certificate does not stand for ``gateway_id``."""
        tls = self.config.tls
        if not (tls.client_ca_file and tls.require_gateway_cert):
            return None
        names = cert_identities(request.peer_cert)
        if not names:
            return "a client certificate is required on this hub"
        if gateway_id not in names:
            return (f"the client certificate ({', '.join(sorted(names))[:100]}) is not "
                    f"gateway {gateway_id!r}'s")
        return None

    # ------------------------------------------------------------------ /ws/live


