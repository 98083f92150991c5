"""What counts as one remote address for a per-address limit: an IPv4 address, or an
IPv6 address's /64.  Shared by the HTTP server's connection cap (edgegw.web) and the
hub's handshake-failure limiter (edgegw.auth), so both count a host the same way."""

from __future__ import annotations

import ipaddress


def address_bucket(host: str) -> str:
    """The bucket of peer address ``host`` (no port): itself for IPv4, its /64 for IPv6.
    A host picks its own IPv6 addresses within its /64 (SLAAC, privacy addresses: 2^64 of
    them), so a share of a limit per address would give it a new share at every
    connection.  An IPv4 client of a dual-stack socket counts as its IPv4 address; what
    is no IP address (a Unix socket's name) is its own bucket."""
    try:
        address = ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def bucket_of(remote: str) -> str:
    """The bucket of a connection from ``remote`` (``host:port``, IPv6 hosts bracketed or
    not): ``address_bucket`` of its host."""
    host = remote.rpartition(":")[0] or remote
    return address_bucket(host)


__all__ = ["address_bucket", "bucket_of"]
