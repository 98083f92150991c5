"""GDR layouts: a compiled reader per type-code sequence that repeats.

A GDR's ``GEN_DATA`` is a type byte before every value, so the generic reader takes one
Python loop step per value.  Testers that write GDRs per part (Teradyne's per-part GDRs,
the A530 file's ``(C*n, I*4)`` pairs) repeat the same sequence of type codes record after
record, only the values change.  For such a *layout* a straight-line reader is generated
once: each run of fixed-size values -- with the type byte and the length of the C*n, B*n
or D*n that ends it -- is one ``struct`` unpack, whose type bytes are compared with the
layout's (one tuple comparison per run), a variable value is one slice, and the
``(code, value)`` list is one list literal.

Exactness: a layout reader returns ``None`` on anything but a record that holds exactly
its layout (a type byte that differs, a value count that differs, a value past the
record's end, the end of the buffer), and the generic reader decodes the record then.
Its values come from the same ``struct`` codes, slices and ``Bits`` as the generic
reader's, so they are the same objects bit for bit (NaN payloads, -0.0, both orders).

Adaptive and bounded: a layout is compiled the third time its sequence is seen in a
file, the reader tried is the last one learnt for the record's value count and first type
code (one dict lookup), at most ``MAX_LAYOUTS`` readers are kept, a file compiles at most
8 plus one per 256 hits, and a file whose layouts do not repeat (fewer hits than half
of ``MAX_SEEN`` sequences learnt) stops learning.  Each decoder (a file) learns in its own
table; the compiled readers, a pure function of the type codes, are shared.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from operator import itemgetter
from typing import Any

from .spec import GDR_TYPES, STRUCT_CODES, Bits

#: compiled readers kept (per byte order and decoder kind); cleared when full
MAX_LAYOUTS = 256
#: distinct sequences remembered until their third sighting; cleared when full
MAX_SEEN = 512
#: longer GDRs are left to the generic reader (a reader's size grows with its layout)
MAX_VALUES = 256

#: a layout reader: (buf, txt, position after the value count, record end) ->
#: (values, position after them), or None when the record does not hold the layout
Reader = Callable[[bytes, str, int, int], "tuple[list[tuple[int, Any]], int] | None"]

_first = itemgetter(0)


def compile_layout(order: str, codes: bytes) -> Reader:
    """The straight-line reader of the GDR values whose type codes are ``codes``."""
    ns: dict[str, Any] = {"_Bits": Bits, "_new": tuple.__new__, "_error": struct.error}
    body: list[str] = []
    items: list[str] = []  # the output list's elements
    fmt = ""  # the current run's struct format (type bytes, values, a length)
    names: list[str] = []  # the locals it unpacks into
    checks: list[str] = []  # its type bytes' comparisons
    size = 0  # the current run's bytes
    run = 0  # runs so far
    # the runs' start positions alternate between two locals, each set once per run
    # (fewer stores and loads than one position moved along)
    base = "p"

    def flush() -> None:
        nonlocal fmt, run, size
        if fmt:
            ns[f"_s{run}"] = struct.Struct(order + fmt).unpack_from
            body.append(f"{', '.join(names)}, = _s{run}(buf, {base})")
            # chained comparisons: cheaper than building and comparing a tuple
            body.append(f"if {' or '.join(checks)}: return None")
            run += 1
        fmt = ""
        names.clear()
        checks.clear()

    for i, code in enumerate(codes):
        typ = GDR_TYPES[code]
        names.append(f"k{i}")
        checks.append(f"k{i} != {code}")
        fmt += "B"
        size += 1
        if code == 0:  # a pad byte: no data
            items.append("(0, None)")
        elif code == 13:  # N*1 in a GDR occupies a whole byte, kept as it is
            fmt += "B"
            names.append(f"v{i}")
            size += 1
            items.append(f"(13, v{i})")
        elif typ in STRUCT_CODES:
            fmt += STRUCT_CODES[typ]
            names.append(f"v{i}")
            size += struct.calcsize(STRUCT_CODES[typ])
            items.append(f"({code}, v{i})")
        else:  # C*n, B*n (a length byte) or D*n (a U*2 bit count): the run ends here
            fmt += "H" if code == 12 else "B"
            names.append(f"n{i}")
            size += 2 if code == 12 else 1
            flush()
            nxt = "q" if base == "p" else "p"
            # the value's start, added once (one int add fewer than writing it twice)
            body.append(f"s = {base} + {size}")
            if code == 12:
                body.append(f"{nxt} = s + ((n{i} + 7) >> 3)")
                body.append(f"v{i} = _new(_Bits, (n{i}, buf[s:{nxt}]))")
            else:
                body.append(f"{nxt} = s + n{i}")
                body.append(f"v{i} = {'txt' if code == 10 else 'buf'}[s:{nxt}]")
            base, size = nxt, 0
            items.append(f"({code}, v{i})")
    flush()
    src = "\n".join([
        "def layout(buf, txt, p, end):",
        "  try:",
        *("    " + line for line in body or ["pass"]),
        "  except _error:",  # past the buffer's end
        "    return None",
        # positions only grow: a value that ends past the record's end shows here
        f"  {base} += {size}" if size else "  pass",
        f"  if {base} > end: return None",
        f"  return [{', '.join(items)}], {base}",
    ]) + "\n"
    exec(compile(src, f"<stdf GDR layout {order}>", "exec"), ns)
    return ns["layout"]


class Layouts:
    """The layout readers of one GDR reader: ``by_key.get(count << 8 | first_code)`` is
    the one to try for a GDR of ``count`` values whose first type code is
    ``first_code`` (None: none yet); ``learn(count, values)`` after a GDR the generic
    reader decoded; ``state``: [learning, hits], the hits counted by the caller."""

    __slots__ = ("by_key", "compiled", "compiles", "order", "seen", "state")

    def __init__(self, order: str, compiled: dict[bytes, Reader] | None = None) -> None:
        self.order = order
        #: value count and first type code -> the reader last learnt for them
        self.by_key: dict[int, Reader] = {}
        #: type-code sequence -> its reader: ``compiled``, which several tables (one per
        #: decoder, a file each) may share
        self.compiled: dict[bytes, Reader] = {} if compiled is None else compiled
        #: sequences seen in this file (since the last clear) -> times seen
        self.seen: dict[bytes, int] = {}
        self.state: list[Any] = [True, 0]
        self.compiles = 0  # in this file

    def learn(self, count: int, values: list[tuple[int, Any]]) -> None:
        if count > MAX_VALUES:
            return
        codes = bytes(map(_first, values))
        reader = self.compiled.get(codes)
        if reader is None:
            seen = self.seen.get(codes, 0)
            if seen < 2:  # compiled when seen a third time: a short random one may repeat
                if not seen and len(self.seen) >= MAX_SEEN:
                    # MAX_SEEN sequences since the last clear: with fewer hits than half
                    # of them this file's layouts do not repeat; stop paying for learning
                    if self.state[1] * 2 < len(self.seen):
                        self.state[0] = False
                    self.state[1] = 0
                    self.seen.clear()
                self.seen[codes] = seen + 1
                return
            # a compile costs what a few hundred hits save: past a few, only as many as
            # the hits pay for (more distinct repeating layouts than MAX_LAYOUTS would
            # otherwise compile them over and over)
            if self.compiles >= 8 + self.state[1] // 256:
                return
            self.compiles += 1
            if len(self.compiled) >= MAX_LAYOUTS:
                self.compiled.clear()
                self.by_key.clear()
            reader = self.compiled[codes] = compile_layout(self.order, codes)
        self.by_key[count << 8 | (codes[0] if codes else 0)] = reader
