"""What an HTTP handler sees and returns: ``Request``, ``Response``, ``json_response``."""

from __future__ import annotations

import dataclasses
import urllib.parse
from typing import Any

from ..jsonutil import dumps


@dataclasses.dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""
    remote: str = ""
    # set by the server's guard (edgegw/auth): who the request acts for
    principal: Any = None
    secure: bool = False  # arrived over TLS
    # the verified client certificate (ssl's getpeercert() dict), when one was presented
    peer_cert: dict[str, Any] | None = None
    # the path as it came, percent-encoded: ``path`` is decoded whole, so an id holding a
    # "/" (sent as %2F) cannot be told from two segments there; ``segments`` can
    raw_path: str = ""

    @property
    def segments(self) -> list[str]:
        """The path's non-empty segments, each percent-decoded on its own."""
        return path_segments(self.raw_path or self.path)


def path_segments(raw_path: str) -> list[str]:
    """``/api/lots/A%2FB/wafers`` -> ``["api", "lots", "A/B", "wafers"]``: split, then
    decode (RFC 3986: an encoded "/" inside a segment is data, not a delimiter)."""
    return [urllib.parse.unquote(p) for p in raw_path.split("/") if p]


@dataclasses.dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(status, dumps(obj).encode())
