"""Reading a request head: h11 events to ``Request``, the framing checks, and the
WebSocket opening-handshake checks (RFC 6455 section 4.2.1) the server applies before it
answers an upgrade; plus the bare error response written without a parser."""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from http import HTTPStatus

import h11

from .http import Request


def status_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def raw_response(status: int, text: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A complete error response written without a parser state (a refused connection)."""
    head = [b"HTTP/1.1 %d %s" % (status, status_phrase(status)), b"content-type: text/plain",
            b"content-length: %d" % len(text), b"connection: close",
            *(name + b": " + value for name, value in headers)]
    return b"\r\n".join(head) + b"\r\n\r\n" + text


def header_tokens(event: h11.Request, name: bytes) -> list[bytes]:
    return [t.strip().lower() for n, v in event.headers if n == name for t in v.split(b",")]


def framing_problem(event: h11.Request) -> str:
    names = {n for n, _ in event.headers}
    if b"transfer-encoding" in names and b"content-length" in names:
        return "Content-Length together with Transfer-Encoding"
    return ""


def head_bytes(event: h11.Request) -> int:
    """The size of a request's head as parsed (request line and header fields, without
    optional whitespace).  h11's ``max_incomplete_event_size`` only catches a head still
    incomplete past the limit; a larger head that arrived in one read is whole and
    passes it, so the limit is checked again on the parsed head."""
    line = len(event.method) + len(event.target) + len(event.http_version) + 8
    return line + sum(len(n) + len(v) + 4 for n, v in event.headers) + 2


def upgrade_problem(event: h11.Request, request: Request) -> str:
    """Why an upgrade request is not a valid WebSocket opening handshake (RFC 6455 4.2.1)."""
    if event.method != b"GET":
        return "a WebSocket upgrade must be a GET request"
    if event.http_version != b"1.1":
        return "a WebSocket upgrade needs HTTP/1.1"
    if b"upgrade" not in header_tokens(event, b"connection"):
        return "a WebSocket upgrade needs Connection: Upgrade"
    if header_tokens(event, b"content-length") not in ([], [b"0"]) or header_tokens(
            event, b"transfer-encoding"):
        return "a WebSocket upgrade must not carry a body"
    if header_tokens(event, b"sec-websocket-version") != [b"13"]:
        return "unsupported Sec-WebSocket-Version (this server speaks 13)"
    key = request.headers.get("sec-websocket-key", "").strip()
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        return "missing or malformed Sec-WebSocket-Key"
    return ""


def to_request(event: h11.Request, remote: str) -> Request:
    target = event.target.decode("latin-1")
    path, _, qs = target.partition("?")
    query = {k: v[-1] for k, v in urllib.parse.parse_qs(qs).items()}
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {val}" if key in headers else val
    return Request(event.method.decode(), urllib.parse.unquote(path), query, headers,
                   remote=remote, raw_path=path)


def is_upgrade(event: h11.Request) -> bool:
    for name, value in event.headers:
        if name.lower() == b"upgrade" and value.lower() == b"websocket":
            return True
    return False
