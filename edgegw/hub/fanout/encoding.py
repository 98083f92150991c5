"""Encodings of ``/ws/live`` messages: CBOR (binary frames) or JSON (text frames), chosen
per client by subprotocol; batches assembled from items encoded once."""

from __future__ import annotations

import json
import math
from typing import Any

import cbor2

from .config import SUBPROTOCOL_JSON


def _cbor_array_head(n: int) -> bytes:
    if n < 24:
        return bytes((0x80 + n,))
    if n < 0x100:
        return bytes((0x98, n))
    if n < 0x10000:
        return b"\x99" + n.to_bytes(2, "big")
    return b"\x9a" + n.to_bytes(4, "big")


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _finite(value: Any) -> Any:
    """NaN and infinities replaced by null: they are not JSON and a browser rejects them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_keys(value: Any) -> Any:
    """Map keys JSON cannot have (a CBOR request may carry any, e.g. in its ``id``) as text."""
    if isinstance(value, dict):
        return {k if k is None or isinstance(k, (str, int, float, bool)) else str(k):
                _json_keys(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_keys(v) for v in value]
    return value


def encode_json(message: Any) -> str:
    try:
        return json.dumps(message, separators=(",", ":"), default=_json_default, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(message), separators=(",", ":"), default=_json_default)
    except TypeError:
        return encode_json(_json_keys(message))


class Encoding:
    """CBOR (binary frames) or JSON (text frames) -- one per client, chosen by subprotocol."""

    def __init__(self, name: str) -> None:
        if name not in ("cbor", "json"):
            raise ValueError(f"unknown encoding {name!r}")
        self.name = name

    def encode(self, message: Any) -> bytes | str:
        return cbor2.dumps(message) if self.name == "cbor" else encode_json(message)

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
    """Text frames are JSON, binary frames CBOR, whatever the subprotocol."""
    if isinstance(data, str):
        return json.loads(data)
    return cbor2.loads(data)
