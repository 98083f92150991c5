"""Who may use the hub, and how its traffic is protected (docs/security.md).

* ``config``: the hub's ``[auth]`` and ``[tls]`` sections.
* ``tokens``: JWT verification (HS256, RS256/ES256, JWKS) and minting; roles and lot scopes.
* ``access``: the HTTP server's guard -- credentials, roles, Origin and content type.
* ``signin``: the dashboard's sign-in page and session cookie.
* ``ratelimit``: failed gateway handshakes per remote address.
* ``hub``: all of it assembled for the hub service.

Kept free of hub imports at package level, so the hub's config can import ``config``.
Public face: the names in ``__all__`` (configs, tokens, the handshake limiter, the hub's
guard).
"""

from typing import TYPE_CHECKING

from ..lazyface import lazy_face
from .config import ROLES, AuthConfig, TlsConfig
from .ratelimit import FailureLimiter
from .tokens import AuthError, Principal, TokenVerifier, jwk_json, mint, parse_ttl

__all__ = [
    "ROLES", "AuthConfig", "AuthError", "FailureLimiter", "HubSecurity", "Principal",
    "TlsConfig", "TokenVerifier", "jwk_json", "mint", "parse_ttl",
]

if TYPE_CHECKING:
    from .hub import HubSecurity as HubSecurity

# ``HubSecurity`` (the hub's whole guard) is loaded on first use: ``hub`` imports the web
# server, which the hub's config, importing ``config`` through this package, must not.
__getattr__, __dir__ = lazy_face(__name__, globals(), {"HubSecurity": "hub"})
