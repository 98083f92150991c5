"""Text that UTF-8 can carry.

A Python string may hold lone surrogates: bytes that were not UTF-8, kept by
``os.fsdecode`` or ``surrogateescape`` (a Latin-1 file name on Linux, a ``--set`` typed in
another encoding), or a JSON ``"\\udce9"`` escape.  No UTF-8 -- CBOR text, the spool, a
reply, a log file -- can hold them.  ``is_unicode`` tells such a string, ``unicode_text``
writes it out with escapes, and ``unicode_value`` does that to every text inside a value
(a record, a decoded message), returning the very same object when nothing needed it, so
``unicode_value(v) is not v`` also tells whether anything did.  Pure functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def is_unicode(text: str) -> bool:
    """Whether UTF-8 can carry ``text`` (it holds no lone surrogate)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unicode_text(text: str) -> str:
    """``text``, its lone surrogates written out as escapes: the bytes they stand for as
    ``\\xNN`` (``lot_\\xe9.stdf`` for the byte E9), any other as ``\\uNNNN``.  ``text``
    itself when it holds none."""
    if is_unicode(text):
        return text
    try:  # surrogates standing for bytes: those bytes
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # other lone surrogates (U+D800...)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def unicode_value(value: Any, other: Callable[[Any], Any] = lambda v: v) -> Any:
    """``value`` with every text in it (through lists, tuples, named tuples and maps, keys
    too) made ``unicode_text``, and every other leaf passed through ``other``: the same
    object wherever nothing changed."""
    if isinstance(value, str):
        return unicode_text(value)
    if isinstance(value, (list, tuple)):
        items = [unicode_value(v, other) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, dict):
        pairs = [(unicode_value(k, other), unicode_value(v, other)) for k, v in value.items()]
        if all(a is k and b is v for (a, b), (k, v) in zip(pairs, value.items(), strict=True)):
            return value
        return dict(pairs)
    return other(value)


__all__ = ["is_unicode", "unicode_text", "unicode_value"]
