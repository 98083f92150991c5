"""VAX floating point, for the files of CPU_TYPE 0 (DEC PDP-11/VAX) testers.

Their integers are little-endian, as a PC's; their R*4 fields are VAX F_floating and
R*8 (GDR values) D_floating.  Both store 16-bit little-endian words, most significant
word first: the first word holds the sign (bit 15), an exponent of excess 128 (bits
14-7) and the fraction's top 7 bits; the next word(s) the rest of the fraction.  The
value is ``0.1f`` (binary, the hidden bit just after the point) times ``2**(exp - 128)``:
a quarter of what the same bits say as IEEE.  Exponent 0 is zero (whatever the fraction,
a "dirty zero") with sign 0, and the *reserved operand* (a VAX traps on it) with sign 1:
read as NaN, the value it does not have.  There are no infinities nor NaNs.

Every F value is a Python float exactly (F's range, 2**-128 to 2**127, is a double's
normal range); a D value has 3 fraction bits more than a double and is rounded to the
nearest (ties to even).  Writing, a value out of range raises ``ValueError``, one too
small for F or D writes zero, -0.0 writes zero and NaN the reserved operand.

Pure functions: the decoder (``decoder.vax_table``) reads the record types holding
floats of a file whose FAR says CPU_TYPE 0 field by field with these, so files of every
other tester take the same path as before; the writer writes them with ``cpu_type=0``.
"""

from __future__ import annotations

import math
import struct

#: the CPU_TYPE of a FAR whose floats are VAX F/D
VAX_CPU_TYPE = 0

_words2 = struct.Struct("<HH").unpack_from
_words4 = struct.Struct("<HHHH").unpack_from
_pack2 = struct.Struct("<HH").pack
_pack4 = struct.Struct("<HHHH").pack
#: the reserved operand: sign 1, exponent 0 (what NaN is written as)
_RESERVED_F = _pack2(0x8000, 0)
_RESERVED_D = _pack4(0x8000, 0, 0, 0)


def f_float(buf: bytes, p: int) -> float:
    """The VAX F_floating value of the 4 bytes at ``buf[p:]``."""
    w0, w1 = _words2(buf, p)
    exp = (w0 >> 7) & 0xFF
    if not exp:
        return math.nan if w0 & 0x8000 else 0.0
    # 24-bit significand 0.1f: value = significand * 2**(exp - 128 - 24)
    value = math.ldexp(0x800000 | (w0 & 0x7F) << 16 | w1, exp - 152)
    return -value if w0 & 0x8000 else value


def d_float(buf: bytes, p: int) -> float:
    """The VAX D_floating value of the 8 bytes at ``buf[p:]`` (rounded to a double)."""
    w0, w1, w2, w3 = _words4(buf, p)
    exp = (w0 >> 7) & 0xFF
    if not exp:
        return math.nan if w0 & 0x8000 else 0.0
    # 56-bit significand: int -> float rounds to nearest even, ldexp is then exact
    value = math.ldexp(float((0x80 | w0 & 0x7F) << 48 | w1 << 32 | w2 << 16 | w3), exp - 184)
    return -value if w0 & 0x8000 else value


def _split(value: float, bits: int, what: str) -> tuple[int, int, int] | None:
    """(sign, exponent, significand of ``bits`` bits) of ``value`` rounded to nearest
    even; None for zero (and for a value too small to write)."""
    if math.isinf(value):
        raise ValueError(f"{what}: {value!r} has no VAX floating-point form")
    if value == 0.0:
        return None
    mant, exp = math.frexp(abs(value))  # abs(value) = mant * 2**exp, 0.5 <= mant < 1: 0.1f
    sig = round(math.ldexp(mant, bits))  # exact product; round() ties to even
    if sig >> bits:  # rounded up to 1.0
        sig >>= 1
        exp += 1
    exp += 128
    if exp > 255:
        raise ValueError(f"{what}: {value!r} is too large for VAX floating point")
    if exp < 1:
        return None  # below 2**-128: zero, as a VAX's underflow gives
    return (0x8000 if value < 0 else 0), exp, sig


def f_bytes(value: float, what: str = "R*4") -> bytes:
    """``value`` as VAX F_floating (rounded to 24 bits, ties to even)."""
    if math.isnan(value):
        return _RESERVED_F
    parts = _split(value, 24, what)
    if parts is None:
        return bytes(4)
    sign, exp, sig = parts
    return _pack2(sign | exp << 7 | (sig >> 16) & 0x7F, sig & 0xFFFF)


def d_bytes(value: float, what: str = "R*8") -> bytes:
    """``value`` as VAX D_floating (exact: a double's 53 bits fit D's 56)."""
    if math.isnan(value):
        return _RESERVED_D
    parts = _split(value, 56, what)
    if parts is None:
        return bytes(8)
    sign, exp, sig = parts
    return _pack4(sign | exp << 7 | (sig >> 48) & 0x7F, (sig >> 32) & 0xFFFF,
                  (sig >> 16) & 0xFFFF, sig & 0xFFFF)


__all__ = ["VAX_CPU_TYPE", "d_bytes", "d_float", "f_bytes", "f_float"]
