"""What an HTTP handler sees and returns: ``Request``, ``Response``, ``json_response``."""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(status, dumps(obj).encode())
