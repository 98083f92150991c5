"""DNS rebinding: the ``Host`` names a server without sign-in answers (docs/security.md).

A web page on an attacker's domain can point that domain's name at 127.0.0.1 (or at any
address the browser reaches): the browser then sends the attacker's name as ``Host`` and
``Origin``, the request looks same-origin, and the page reads the answer.  Without sign-in
nothing else stops it, so such a server answers only a ``Host`` no outside DNS can answer
for: an IP address, a name without a dot (``localhost``, a hosts-file or search-domain name:
there are no dotless domains on the internet), a name the administrator listed, or none.

One rule for the hub without sign-in (``auth.allowed_origins``, edgegw/auth/access.py) and
the gateway's status port (``gateway.status_allowed_hosts``).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Collection, Iterable

from ..metrics import Metric
from .http import Request, Response, json_response

log = logging.getLogger("edgegw.web")


def host_name(host_header: str) -> str:
    """The name of a ``Host`` header, without its port and brackets, lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [v6]:port
        return host[1:].partition("]")[0]
    if host.count(":") == 1:  # name:port; more colons: a bare IPv6 address
        return host.partition(":")[0]
    return host


def host_allowed(host_header: str, names: Collection[str]) -> bool:
    """Whether a server without sign-in answers a request with this ``Host``: an IP address,
    a name without a dot, one of ``names`` (lower case, no port), or no ``Host`` at all
    (HTTP/1.0 scripts; a browser always sends one)."""
    host = host_name(host_header)
    if not host or "." not in host or host in names:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostRule:
    """``host_allowed`` with its refusal: 403 saying which key lists more names, counted in
    ``refused`` (``reason="host"``), logged with the header and the path quoted (``%r``:
    neither can break the log line, though the path is percent-decoded)."""

    def __init__(self, names: Iterable[str], *, key: str, refused: Metric) -> None:
        self.names = frozenset(n.strip().lower().rstrip(".") for n in names) - {""}
        self.key = key
        self.refused = refused

    def check(self, request: Request) -> Response | None:
        host = request.headers.get("host", "")
        if host_allowed(host, self.names):
            return None
        self.refused.inc(reason="host")
        log.info("refused %s %r from %s: Host %r is not an address, a dotless name or a host "
                 "of %s", request.method, request.path[:200], request.remote, host[:100],
                 self.key)
        return json_response({"error": "no sign-in on this port: it answers only to an IP "
                                       "address, a dotless name or a host of "
                                       f"{self.key} in Host"}, 403)

    def guard(self, public: Collection[str] = ()) -> Callable[[Request, bool], Response | None]:
        """An ``HttpServer.guard`` applying the rule to every path but ``public``."""
        def guard(request: Request, upgrade: bool) -> Response | None:
            return None if request.path in public else self.check(request)
        return guard
