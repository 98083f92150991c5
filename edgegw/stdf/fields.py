"""Building STDF field dicts for a format plugin, and keying tests that have only a name.

A format plugin yields records under STDF names with STDF fields (docs/plugins.md).  An
STDF record's fields are positional: a reader sees every field up to the last one
written, so a field in the middle that the plugin's input lacks still has a value -- the
spec's "missing" value (X_COORD -32768, SOFT_BIN 65535, a U4 count 4294967295, ...), which
the mapping reads as absent.  ``stdf_fields`` does that filling, and checks what a binary
STDF file could not hold (an unknown field name, an integer outside its type).

``test_number`` gives a format whose tests have names but no numbers a stable TEST_NUM.
Both are exported from ``edgegw.stdf`` (its public face, for plugins).
"""

from __future__ import annotations

import zlib
from typing import Any

from .spec import BY_NAME, missing_value

#: STDF integer types -> the range of their values
INT_RANGES: dict[str, tuple[int, int]] = {
    "U1": (0, 2**8 - 1), "U2": (0, 2**16 - 1), "U4": (0, 2**32 - 1), "U8": (0, 2**64 - 1),
    "I1": (-(2**7), 2**7 - 1), "I2": (-(2**15), 2**15 - 1), "I4": (-(2**31), 2**31 - 1),
    "I8": (-(2**63), 2**63 - 1), "B1": (0, 255), "N1": (0, 15),
}


def stdf_fields(name: str, present: dict[str, Any]) -> dict[str, Any]:
    """The fields an STDF reader would see for record ``name`` written with ``present``:
    in spec order up to the last present field; an absent field before it gets the spec's
    missing value; fields after it stay absent (the record "ends early", as STDF allows).

    Raises ``ValueError`` naming the problem for an unknown record or field name and for an
    integer outside its STDF type (a HEAD_NUM of 300: U1 is 0-255) -- a parser turns that
    into ``FormatError`` with the record's offset.  Lists (``kxTYPE`` arrays) are checked
    element by element."""
    spec = BY_NAME.get(name)
    if spec is None:
        raise ValueError(f"{name!r} is not an STDF record name")
    index = {f.name: i for i, f in enumerate(spec.fields)}
    unknown = [k for k in present if k not in index]
    if unknown:
        raise ValueError(f"{name} has no field {', '.join(map(repr, unknown))}")
    last = max((index[k] for k in present), default=-1)
    out: dict[str, Any] = {}
    for fld in spec.fields[: last + 1]:
        if fld.name not in present:
            out[fld.name] = missing_value(fld)
            continue
        value = out[fld.name] = present[fld.name]
        bounds = INT_RANGES.get(fld.type)
        if bounds is None or value is None:
            continue
        for v in value if isinstance(value, list) else (value,):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name}.{fld.name} must be an integer ({fld.type}), "
                                 f"not {v!r:.40}")
            if not bounds[0] <= v <= bounds[1]:
                raise ValueError(f"{fld.name} {v} is out of range ({bounds[0]} to "
                                 f"{bounds[1]})")
    return out


def test_number(name: str) -> int:
    """A stable TEST_NUM for a test known only by its name: the CRC-32 of its UTF-8 bytes
    (0 to 4294967295, STDF's U4).  The same name gives the same number in every file, on
    every gateway and every version of edgegw, so the hub's per-test topic
    ``test/<lot>/<number>`` collects one test across files; put the name itself in
    TEST_TXT and the dashboard shows it.  Two names with one CRC are possible (among 4,000
    names, about a 1 in 500 chance): a format with that many names should number them
    itself."""
    return zlib.crc32(name.encode("utf-8"))


test_number.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
