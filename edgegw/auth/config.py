"""The hub's ``[auth]`` and ``[tls]`` sections (docs/security.md, docs/configuration.md)."""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Literal

from ..config import Range

ROLES = ("viewer", "operator", "admin")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


@dataclasses.dataclass(frozen=True)
class AuthConfig:
    """Who may use the dashboard, the API and ``/ws/live``.

    ``mode = "jwt"``: every request but ``/healthz``, the sign-in page and the gateway
    endpoint needs a valid token.  ``mode = "none"``: everything is open (a warning at start
    and on ``/healthz``); only allowed on a loopback ``listen`` unless written explicitly."""

    mode: Literal["jwt", "none"] = "jwt"
    # Verification keys: an HS256 shared secret (inline or from a file), a PEM public key
    # (RS256/ES256) or a JWKS file.  At least one in "jwt" mode.
    hs256_secret: str = dataclasses.field(default="", repr=False)
    hs256_secret_file: str = ""
    public_key_file: str = ""
    jwks_file: str = ""
    issuer: str = ""  # checked when set
    audience: str = ""  # checked when set
    leeway_s: Annotated[float, Range(0, 3600)] = 30.0
    # the claim naming the user and the claim holding the role(s): a string or a list
    user_claim: str = "sub"
    role_claim: str = "role"
    # IdP group/role names -> viewer, operator or admin (the names themselves always work)
    role_map: dict[str, str] = dataclasses.field(default_factory=dict)
    # a header that a trusted SSO proxy sets to the user's JWT (e.g. oauth2-proxy's
    # "X-Forwarded-Access-Token"); read only from these proxy addresses
    proxy_header: str = ""
    trusted_proxies: list[str] = dataclasses.field(default_factory=list)
    # origins (scheme://host[:port]) allowed to open /ws/live and send state-changing
    # requests besides the hub's own
    allowed_origins: list[str] = dataclasses.field(default_factory=list)
    # /metrics: a bearer token of its own for Prometheus (in clear or as its SHA-256);
    # without one, /metrics needs an admin token
    metrics_token: str = dataclasses.field(default="", repr=False)
    metrics_token_sha256: str = ""
    # the sign-in cookie lives at most this long (and never past the token's expiry)
    session_max_age_s: Annotated[float, Range(60, 30 * 86_400)] = 12 * 3600.0

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if self.mode == "jwt" and not (self.hs256_secret or self.hs256_secret_file
                                       or self.public_key_file or self.jwks_file):
            problems.append(("mode", "\"jwt\" needs hs256_secret, hs256_secret_file, "
                             "public_key_file or jwks_file"))
        if self.hs256_secret and len(self.hs256_secret) < 32:
            problems.append(("hs256_secret", "must be at least 32 characters"))
        for name, role in self.role_map.items():
            if role not in ROLES:
                problems.append((f"role_map.{name}", f"must be one of {', '.join(ROLES)}"))
        if self.proxy_header and not self.trusted_proxies:
            problems.append(("trusted_proxies", "proxy_header needs the proxies' addresses"))
        if self.metrics_token_sha256 and not _HEX64.fullmatch(self.metrics_token_sha256):
            problems.append(("metrics_token_sha256", "must be 64 hex digits"))
        for origin in self.allowed_origins:
            if not re.fullmatch(r"https?://[^/\s]+", origin):
                problems.append(("allowed_origins", f"not an origin (scheme://host[:port]): "
                                 f"{origin!r}"))
        return problems


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """TLS on the hub's one port.  ``cert_file``/``key_file`` are read again on SIGHUP."""

    cert_file: str = ""
    key_file: str = ""
    # CA(s) whose client certificates are accepted; set: gateways must present one
    client_ca_file: str = ""
    # with client_ca_file: the certificate's identity (its subject CN or a DNS
    # subjectAltName) must equal the gateway id of the HELLO
    require_gateway_cert: bool = True
    min_version: Literal["1.2", "1.3"] = "1.2"

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if bool(self.cert_file) != bool(self.key_file):
            problems.append(("key_file", "cert_file and key_file go together"))
        if self.client_ca_file and not self.cert_file:
            problems.append(("client_ca_file", "needs cert_file and key_file (TLS)"))
        return problems
