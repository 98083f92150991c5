"""Who may do what on the hub's port: the HTTP server's guard (docs/security.md).

Every request and every WebSocket upgrade passes ``Access.check`` before its handler:

1. Cross-site: a state-changing request (anything but GET/HEAD) and every upgrade whose
   ``Origin`` is neither the hub's own nor in ``auth.allowed_origins`` is refused (403); a
   state-changing request must be ``application/json`` (415), which a page on another site
   cannot send without a CORS preflight this hub never grants.  These hold in
   ``auth.mode = "none"`` too: they protect the people on the floor, not the data.
2. Public: ``/healthz``, the sign-in page and the gateway endpoint (gateways have tokens
   of their own).
   Without sign-in, everything else must be asked for by a ``Host`` that cannot be
   rebound: an IP address, a name without a dot (``localhost``) or a host of
   ``auth.allowed_origins`` (403 otherwise).  DNS rebinding -- a page whose own name the
   attacker points at the hub -- makes a request look same-origin to the check above, and
   without sign-in nothing else stops it; with sign-in the browser holds no credential
   for the attacker's name.
3. A credential -- ``Authorization: Bearer``, the SSO proxy's header (from a trusted proxy
   address only) or the session cookie -- is verified; none or a bad one: 401 (a browser
   navigating to a page is sent to ``/login`` instead).
4. The route's role: ``viewer`` reads, ``operator`` acknowledges, ``admin`` sees stats and
   metrics.  Too low: 403.  ``/metrics`` also takes its own bearer token (Prometheus).
5. A lot-scoped token (``lots`` claim) gets 404 for a lot outside its scope, as if the lot
   did not exist; listings are filtered where they are built (the history API).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import urllib.parse
from http.cookies import CookieError, SimpleCookie

from ..metrics import Metrics
from ..web import Request, Response
from ..web.hosts import HostRule
from .config import AuthConfig
from .tokens import ANONYMOUS_ADMIN, AuthError, Principal, TokenVerifier

log = logging.getLogger("edgegw.auth")

COOKIE = "edgegw_session"
SAFE_METHODS = frozenset({"GET", "HEAD"})
# (method, path) open to anyone: health, the sign-in page, the gateway endpoint (whose
# HELLO carries the gateway's own token)
PUBLIC = frozenset({("GET", "/healthz"), ("GET", "/login"), ("GET", "/login.js"),
                    ("POST", "/login"), ("POST", "/logout"), ("GET", "/ws/gateway")})
ADMIN_PREFIXES = ("/api/stats", "/api/live/stats", "/api/gateways")
# paths whose third segment names a lot: /api/lots/<lot>/..., /api/tests/<lot>/...
LOT_ROUTES = (["api", "lots"], ["api", "tests"])


def required_role(method: str, path: str) -> str | None:
    """The role a request needs: None (public), "metrics", or a role name."""
    method = "GET" if method == "HEAD" else method
    if (method, path) in PUBLIC:
        return None
    if path == "/metrics":
        return "metrics"
    if path.startswith(ADMIN_PREFIXES):
        return "admin"
    if method == "GET":
        return "viewer"
    if method == "POST" and path.startswith("/api/alerts/") and path.endswith("/ack"):
        return "operator"
    return "admin"


def _json(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, json.dumps({"error": message}).encode(), headers=headers or [])


class Access:
    """The guard.  ``verifier`` is None in ``mode = "none"``."""

    def __init__(self, config: AuthConfig | None, verifier: TokenVerifier | None, *,
                 metrics: Metrics | None = None) -> None:
        m = metrics or Metrics()
        self.m_denied = m.counter("hub_requests_denied_total",
                                  "requests and upgrades refused by the access guard, by reason")
        self.reconfigure(config, verifier)

    def reconfigure(self, config: AuthConfig | None, verifier: TokenVerifier | None) -> None:
        """Check every request from now on against ``config`` and ``verifier`` (at start,
        and when a SIGHUP reloads ``[auth]``: HubSecurity.use_auth)."""
        self.config = config or AuthConfig(mode="none")
        self.verifier = verifier
        self.proxies = [ipaddress.ip_network(p, strict=False)
                        for p in self.config.trusted_proxies]
        self.origins = {o.lower().rstrip("/") for o in self.config.allowed_origins}
        # host names besides IP addresses and dotless names a hub without sign-in answers to
        self.hosts = HostRule((urllib.parse.urlsplit(o).hostname or "" for o in self.origins),
                              key="auth.allowed_origins", refused=self.m_denied)

    @property
    def open(self) -> bool:
        return self.verifier is None

    # ------------------------------------------------------------------ the guard

    def check(self, request: Request, upgrade: bool) -> Response | None:
        method = request.method
        if upgrade or method not in SAFE_METHODS:
            refusal = self._cross_site(request, upgrade)
            if refusal is not None:
                return refusal
        need = required_role(method, request.path)
        if need is None:
            return None
        if need == "metrics" and self._metrics_token_ok(request):
            request.principal = Principal("prometheus", "admin", via="metrics_token")
            return None
        if self.verifier is None:
            refusal = self.hosts.check(request)
            if refusal is not None:
                return refusal
            request.principal = ANONYMOUS_ADMIN
            return None
        try:
            principal = self.authenticate(request)
        except AuthError as exc:
            return self._unauthenticated(request, str(exc))
        request.principal = principal
        if not principal.has("admin" if need == "metrics" else need):
            self.m_denied.inc(reason="role")
            return _json(403, f"{principal.role} may not {method} {request.path} "
                              f"(needs {'admin' if need == 'metrics' else need})")
        lot = lot_of_path(request.segments)
        if lot is not None and not principal.sees_lot(lot):
            self.m_denied.inc(reason="lot_scope")
            return _json(404, f"unknown lot {lot!r}")
        return None

    def authenticate(self, request: Request) -> Principal:
        """The request's principal from its credential; AuthError if none is accepted."""
        assert self.verifier is not None
        token, via = self._credential(request)
        if not token:
            raise AuthError("sign-in required: no token (Authorization: Bearer, or the "
                            "session cookie from /login)")
        principal = self.verifier.verify(token)
        return Principal(principal.user, principal.role, principal.lots,
                         principal.expires_at, via)

    def verify_token(self, token: str) -> Principal:
        if self.verifier is None:
            raise AuthError("this hub has no sign-in (auth.mode = \"none\")")
        return self.verifier.verify(token)

    # ------------------------------------------------------------------ pieces

    def _credential(self, request: Request) -> tuple[str, str]:
        headers = request.headers
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip(), "bearer"
        name = self.config.proxy_header.lower()
        if name and headers.get(name) and self._from_proxy(request.remote):
            return headers[name].strip(), "proxy"
        cookie = headers.get("cookie")
        if cookie:
            try:
                jar = SimpleCookie(cookie)
            except CookieError:
                return "", ""
            morsel = jar.get(COOKIE)
            if morsel is not None and morsel.value:
                return morsel.value, "cookie"
        return "", ""

    def _from_proxy(self, remote: str) -> bool:
        host = remote.rpartition(":")[0].strip("[]")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in net for net in self.proxies)

    def _metrics_token_ok(self, request: Request) -> bool:
        cfg = self.config
        if not (cfg.metrics_token or cfg.metrics_token_sha256):
            return False
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return False
        given = value.strip().encode()
        if cfg.metrics_token:
            return hmac.compare_digest(given, cfg.metrics_token.encode())
        digest = hashlib.sha256(given).hexdigest()
        return hmac.compare_digest(digest, cfg.metrics_token_sha256.lower())

    def _cross_site(self, request: Request, upgrade: bool) -> Response | None:
        origin = request.headers.get("origin")
        if origin is not None and not self.origin_allowed(request, origin):
            self.m_denied.inc(reason="origin")
            # the path quoted (%r): percent-decoded, it may hold a newline that would
            # forge a log line of its own, or terminal escapes
            log.info("refused %s %r from %s: cross-site Origin %r", request.method,
                     request.path[:200], request.remote, origin[:100])
            return _json(403, f"cross-site request refused: Origin {origin[:100]!r} is not "
                              "this hub's and not in auth.allowed_origins")
        if not upgrade:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                self.m_denied.inc(reason="content_type")
                return _json(415, "a state-changing request must be application/json")
        return None

    def origin_allowed(self, request: Request, origin: str) -> bool:
        origin = origin.strip().lower().rstrip("/")
        if origin in self.origins:
            return True
        parts = urllib.parse.urlsplit(origin)
        host = request.headers.get("host", "").strip().lower()
        scheme = "https" if request.secure else "http"
        return bool(host) and parts.scheme == scheme and parts.netloc == host

    def _unauthenticated(self, request: Request, reason: str) -> Response:
        self.m_denied.inc(reason="unauthenticated")
        wants_page = (request.method in SAFE_METHODS and not request.path.startswith("/api/")
                      and "text/html" in request.headers.get("accept", ""))
        if wants_page:  # a person's browser: the sign-in page, then back here
            target = urllib.parse.quote(request.path, safe="/")
            return Response(303, b"", "text/plain", [("location", f"/login?next={target}")])
        return _json(401, reason, [("www-authenticate", 'Bearer realm="edgegw"')])


def lot_of_path(segments: list[str]) -> str | None:
    """The lot a history API path names (``/api/lots/<lot>/...``, ``/api/tests/<lot>/...``),
    from its decoded segments (``Request.segments``: a lot id holding "/" is one segment),
    as the history API reads it."""
    if len(segments) >= 3 and segments[:2] in LOT_ROUTES:
        return segments[2]
    return None
