"""Payload decoders: MQTT message bytes -> (value, timestamp or None).

Built in: ``json`` (an object, the value at a dotted path, an optional timestamp field)
and ``number`` (the payload is a plain decimal number).  Others are plugins: a package
registers a factory under the entry-point group ``edgegw.payloads``; the factory is
called once per subscription with that subscription's ``payload_options`` table and
returns the decoder.  A decoder raises ``PayloadError`` with a short reason for input it
cannot decode; the source counts and logs it and carries on.

The built-in decoders are total: whatever the bytes (a 401-digit integer, JSON nested
100,000 deep, a year-0 timestamp, megabytes of text), they return a reading or raise
``PayloadError`` -- never another exception, which would escape the MQTT callback.
``tests/test_fuzz_parsers.py`` holds them to that with hypothesis.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Callable, Mapping
from datetime import datetime
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "edgegw.payloads"

#: Timestamps must lie in [0, year 10000): outside it a value is not seconds since the
#: epoch (a common slip: milliseconds, 1.7e12, which would read as the year 55,000).
MAX_TIMESTAMP = 253402300800.0

#: bytes -> (value, timestamp in seconds since the epoch or None for "arrival time")
Decoder = Callable[[bytes | bytearray], tuple[float, float | None]]
DecoderFactory = Callable[[Mapping[str, Any]], Decoder]


class PayloadError(ValueError):
    """A payload that does not decode; ``str()`` is the reason, short enough to log."""


def _number(raw: Any, what: str) -> float:
    if isinstance(raw, bool):
        return 1.0 if raw else 0.0
    if not isinstance(raw, (int, float)):
        if raw is None:
            raise PayloadError(f"{what} is null, not a number")
        kinds: dict[type, str] = {str: "the string", dict: "an object", list: "an array"}
        kind = kinds.get(type(raw), "")
        raise PayloadError(f"{what} is {kind or type(raw).__name__} {_short(raw)}, not a number")
    try:
        value = float(raw)
    except OverflowError:  # an int beyond 1.8e308: JSON allows 4,300 digits
        raise PayloadError(f"{what} is an integer of {int(raw).bit_length()} bits, too large "
                           "for a number") from None
    if not math.isfinite(value):
        raise PayloadError(f"{what} is not finite ({value})")
    return value


# Bounded in size and depth whatever the value (a repr of the whole value could take
# megabytes, or recurse as deep as the JSON did).
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlong = 2, 40, 40, 40


def _short(raw: Any) -> str:
    text = _repr.repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def _timestamp(raw: Any, what: str) -> float:
    if isinstance(raw, str):
        try:
            dt = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise PayloadError(f"{what} {_short(raw)} is not an ISO 8601 time") from None
        try:
            ts = dt.timestamp()
        except (ValueError, OverflowError, OSError):  # naive, near year 1: local zone fails
            raise PayloadError(f"{what} {_short(raw)} is out of range") from None
    else:
        ts = _number(raw, what)
    if not 0.0 <= ts < MAX_TIMESTAMP:
        raise PayloadError(f"{what} {_short(raw)} is not seconds since 1970 (before 1970 "
                           "or after 9999; milliseconds?)")
    return ts


def _path(path: str) -> list[str | int]:
    return [int(p) if p.isdigit() else p for p in path.split(".") if p]


def _get(doc: Any, path: list[str | int], name: str) -> Any:
    node = doc
    for key in path:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            raise PayloadError(f"no {name!r} in the payload") from None
    return node


def json_decoder(value_path: str = "value", timestamp_field: str = "") -> Decoder:
    """JSON: the value at ``value_path`` (dotted, list indices as numbers; "" means the
    document itself is the number), the time at ``timestamp_field`` (seconds since the
    epoch or ISO 8601) when given.  Booleans read as 1 and 0."""
    vpath = _path(value_path)
    tpath = _path(timestamp_field) if timestamp_field else None
    loads = json.loads

    def decode(payload: bytes | bytearray) -> tuple[float, float | None]:
        try:
            # decoding first skips json's byte-encoding detection (a tenth of its cost)
            doc = loads(payload.decode())
        except (ValueError, UnicodeDecodeError) as exc:
            raise PayloadError(f"not JSON: {_first_line(exc)}") from None
        except RecursionError:  # json's C scanner stops cleanly at the recursion limit
            raise PayloadError("not JSON we can read: nested too deep") from None
        value = _number(_get(doc, vpath, value_path) if vpath else doc, "value")
        if tpath is None:
            return value, None
        return value, _timestamp(_get(doc, tpath, timestamp_field), timestamp_field)

    return decode


def _first_line(exc: Exception) -> str:
    text = str(exc).split("\n", 1)[0]
    return text if len(text) <= 100 else text[:97] + "..."


def decode_number(payload: bytes | bytearray) -> tuple[float, float | None]:
    try:
        value = float(payload.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise PayloadError(f"not a number: {_short(payload[:41])}") from None
    if not math.isfinite(value):
        raise PayloadError(f"not finite: {_short(payload[:41])}")
    return value, None


class UnknownPayloadDecoder(LookupError):
    pass


def plugin_factories() -> dict[str, DecoderFactory]:
    found: dict[str, DecoderFactory] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found[ep.name] = ep.load()
        except Exception:  # a broken plugin must not take the gateway down
            continue
    return found


def make_decoder(name: str, *, value_path: str = "value", timestamp_field: str = "",
                 options: Mapping[str, Any] | None = None) -> Decoder:
    """The decoder called ``name`` (built in or plugin); UnknownPayloadDecoder if none."""
    if name == "json":
        return json_decoder(value_path, timestamp_field)
    if name == "number":
        return decode_number
    factories = plugin_factories()
    factory = factories.get(name)
    if factory is None:
        known = ", ".join(sorted({"json", "number", *factories}))
        raise UnknownPayloadDecoder(f"unknown payload decoder {name!r} (installed: {known})")
    return factory(dict(options or {}))
