"""Encodings of ``/ws/live`` messages: CBOR (binary frames) or JSON (text frames), chosen
per client by subprotocol; batches assembled from items encoded once."""

from __future__ import annotations

import json
from typing import Any

import cbor2

from ...jsonutil import dumps, loads
from .config import SUBPROTOCOL_JSON


def _cbor_array_head(n: int) -> bytes:
    if n < 24:
        return bytes((0x80 + n,))
    if n < 0x100:
        return bytes((0x98, n))
    if n < 0x10000:
        return b"\x99" + n.to_bytes(2, "big")
    return b"\x9a" + n.to_bytes(4, "big")


class Encoding:
    """CBOR (binary frames) or JSON (text frames) -- one per client, chosen by subprotocol."""

    def __init__(self, name: str) -> None:
        if name not in ("cbor", "json"):
            raise ValueError(f"unknown encoding {name!r}")
        self.name = name

    def encode(self, message: Any) -> bytes | str:
        """Raises ValueError for a message this encoding cannot carry (in CBOR: a cyclic
        value or a type cbor2 decodes but cannot encode, e.g. a client's tag-36 MIME id;
        cbor2's encode errors are not ValueErrors)."""
        if self.name == "json":
            return dumps(message)
        try:
            return cbor2.dumps(message)
        except cbor2.CBOREncodeError as exc:
            raise ValueError(f"cannot encode in CBOR: {exc}") from None

    def batch(self, ts: float, items: list[bytes | str]) -> bytes | str:
        """A ``batch`` message assembled from already-encoded items (no re-encoding)."""
        if self.name == "cbor":
            head = (
                b"\xa3" + cbor2.dumps("type") + cbor2.dumps("batch") + cbor2.dumps("ts")
                + cbor2.dumps(ts) + cbor2.dumps("items") + _cbor_array_head(len(items))
            )
            return head + b"".join(items)  # type: ignore[arg-type]
        return '{"type":"batch","ts":' + json.dumps(ts) + ',"items":[' + ",".join(items) + "]}"  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"Encoding({self.name!r})"


CBOR = Encoding("cbor")
JSON = Encoding("json")


def encoding_for_subprotocol(subprotocol: str | None) -> Encoding:
    return JSON if subprotocol == SUBPROTOCOL_JSON else CBOR


def decode_client_message(data: bytes | str) -> Any:
    """Text frames are JSON, binary frames CBOR, whatever the subprotocol.  ValueError for
    JSON whose ``\\uXXXX`` escapes leave a lone surrogate (``jsonutil.loads``): CBOR's own
    text is checked UTF-8 by its decoder."""
    if isinstance(data, str):
        return loads(data)
    return cbor2.loads(data)
