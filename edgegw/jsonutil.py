"""One compact JSON dump for everything edgegw writes as JSON (HTTP responses, the live
fan-out's JSON frames, webhooks, the history store), and one reader of the JSON others
send it (``loads``: request bodies, live subscribers' messages)."""

from __future__ import annotations

import json
import math
from typing import Any

from .unicodetext import unicode_value


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


def dumps(message: Any) -> str:
    """``message`` as compact JSON text, always valid: NaN and infinities as null, bytes
    as hex, sets and tuples as lists, any other value as its ``str``, map keys JSON cannot
    have as text."""
    try:
        return json.dumps(message, separators=(",", ":"), default=_json_default, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(message), separators=(",", ":"), default=_json_default)
    except TypeError:
        return dumps(_json_keys(message))


def loads(data: bytes | bytearray | str) -> Any:
    """``json.loads``, and ValueError for text whose ``\\uXXXX`` escapes leave a lone
    surrogate (``"\\udce9"``): valid JSON, but no Unicode -- no reply, log line, CBOR frame
    or database row could carry it (a user name so, taken into an alert, broke that alert's
    live topic for every CBOR dashboard)."""
    value = json.loads(data)
    escaped = b"\\u" in data if isinstance(data, (bytes, bytearray)) else "\\u" in data
    if escaped and unicode_value(value) is not value:
        raise ValueError("a \\u escape leaves a lone surrogate: not Unicode text")
    return value


__all__ = ["dumps", "loads"]
