"""STDF V4 writer: records (name + field dict) to bytes, either byte order.

``encode`` writes the fields of the spec table in order up to the last one present in the
dict.  Absent fields after it are not written (the record is shorter: REC_LEN tells a
reader they are missing, as testers do); absent fields before it get the spec's
"missing" value.  A ``kxTYPE`` array whose count field is absent gets its count from the
array's length.  Values use the decoder's representation (see :mod:`edgegw.stdf.spec`),
so ``decode(encode(name, fields)) == fields`` for every record the decoder can return.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

from .spec import BY_NAME, GDR_TYPES, STRUCT_CODES, Bits, Field, RecordSpec, missing_value
from .vax import d_bytes, f_bytes

_UF_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


def _text(value: str | bytes, what: str, limit: int) -> bytes:
    data = value.encode("latin-1") if isinstance(value, str) else bytes(value)
    if len(data) > limit:
        raise ValueError(f"{what}: {len(data)} bytes is longer than {limit}")
    return data


class StdfWriter:
    """Encodes records; ``byte_order`` is "<" (CPU_TYPE 2) or ">" (CPU_TYPE 1).
    ``cpu_type=0`` (with "<") writes a DEC PDP-11/VAX tester's file: its R*4 and R*8 as
    VAX F and D floating (:mod:`edgegw.stdf.vax`), its FAR CPU_TYPE 0."""

    def __init__(self, byte_order: str = "<", cpu_type: int | None = None) -> None:
        if byte_order not in ("<", ">"):
            raise ValueError(f"byte_order must be '<' or '>', not {byte_order!r}")
        if cpu_type == 0 and byte_order != "<":
            raise ValueError("CPU_TYPE 0 (VAX) files are little-endian: byte_order '<'")
        self.byte_order = byte_order
        self.cpu_type = cpu_type if cpu_type is not None else 2 if byte_order == "<" else 1
        self._structs = {t: struct.Struct(byte_order + c).pack for t, c in STRUCT_CODES.items()}
        #: the float types written field by field (VAX): not packed as IEEE arrays
        self._floats: frozenset[str] = frozenset()
        if self.cpu_type == 0:
            self._structs["R4"], self._structs["R8"] = f_bytes, d_bytes
            self._floats = frozenset({"R4", "R8"})
        self._header = struct.Struct(byte_order + "HBB").pack
        self._u2 = struct.Struct(byte_order + "H").pack

    def encode(self, name: str, fields: Mapping[str, Any]) -> bytes:
        spec = BY_NAME.get(name)
        if spec is None:
            raise ValueError(f"unknown STDF record type {name!r}")
        if name == "FAR" and "CPU_TYPE" not in fields:
            fields = {"CPU_TYPE": self.cpu_type, "STDF_VER": 4, **fields}
        body = self.encode_fields(spec, fields)
        if len(body) > 65535:
            raise ValueError(f"{name}: {len(body)} bytes of fields exceed REC_LEN's 65535")
        return self._header(len(body), spec.typ, spec.sub) + body

    def encode_fields(self, spec: RecordSpec, fields: Mapping[str, Any]) -> bytes:
        names = [f.name for f in spec.fields]
        unknown = set(fields) - set(names)
        if unknown:
            raise ValueError(f"{spec.name} has no field(s) {', '.join(sorted(unknown))}")
        last = max((i for i, n in enumerate(names) if n in fields), default=-1)
        values: dict[str, Any] = {}
        # counts of absent count fields come from their arrays
        for f in spec.fields[:last + 1]:
            if f.count is not None and f.name in fields and f.count not in fields:
                values[f.count] = len(fields[f.name])
        out = bytearray()
        for f in spec.fields[:last + 1]:
            if f.name in fields:
                value = fields[f.name]
            elif f.name in values:
                value = values[f.name]
            elif f.count is not None:
                count = values.get(f.count, 0)
                value = [missing_value(f._replace(count=None))] * count
            else:
                value = missing_value(f)
            values[f.name] = value
            if f.count is not None:
                if len(value) != values[f.count]:
                    raise ValueError(f"{spec.name}.{f.name}: {len(value)} elements but "
                                     f"{f.count} = {values[f.count]}")
                self._array(out, f, value, values)
            else:
                self._one(out, f, f.type, value, values)
        return bytes(out)

    def _one(self, out: bytearray, f: Field, typ: str, value: Any,
             values: Mapping[str, Any]) -> None:
        what = f"{f.name} ({typ})"
        if typ == "Cn":
            data = _text(value, what, 255)
            out.append(len(data))
            out += data
        elif typ == "Sn":
            data = _text(value, what, 65535)
            out += self._u2(len(data))
            out += data
        elif typ == "Bn":
            data = bytes(value)
            if len(data) > 255:
                raise ValueError(f"{what}: {len(data)} bytes is longer than 255")
            out.append(len(data))
            out += data
        elif typ == "Dn":
            bits = value if isinstance(value, Bits) else Bits(len(value) * 8, bytes(value))
            if len(bits.data) != (bits.count + 7) // 8:
                raise ValueError(f"{what}: {bits.count} bits need {(bits.count + 7) // 8} "
                                 f"bytes, got {len(bits.data)}")
            out += self._u2(bits.count)
            out += bits.data
        elif typ == "Vn":
            self._gdr(out, value)
        elif typ == "Cf":
            size = values[f.size or ""]  # (the spec names the size field of every Cf, Uf)
            data = _text(value, what, size)
            out += data.ljust(size, b" ")
        elif typ == "Uf":
            size = values[f.size or ""]
            code = _UF_CODES.get(size)
            if code is None:
                raise ValueError(f"{what}: size {size} is not 1, 2, 4 or 8")
            out += struct.pack(self.byte_order + code, value)
        elif typ == "N1":
            out.append(value & 0x0F)
        elif typ == "C1":
            data = _text(value, what, 1)
            out += data or b" "
        else:
            try:
                out += self._structs[typ](value)
            except struct.error as exc:
                raise ValueError(f"{what}: {value!r}: {exc}") from None

    def _array(self, out: bytearray, f: Field, values_: list[Any],
               values: Mapping[str, Any]) -> None:
        if f.type == "N1":
            padded = [*values_, 0] if len(values_) % 2 else values_
            out += bytes((lo & 0x0F) | ((hi & 0x0F) << 4)
                         for lo, hi in zip(padded[::2], padded[1::2], strict=True))
            return
        code = STRUCT_CODES.get(f.type)
        if code is not None and f.type != "C1" and f.type not in self._floats:
            out += struct.pack(f"{self.byte_order}{len(values_)}{code}", *values_)
            return
        for value in values_:
            self._one(out, f, f.type, value, values)

    def _gdr(self, out: bytearray, items: list[tuple[int, Any]]) -> None:
        out += self._u2(len(items))
        for code, value in items:
            typ = GDR_TYPES.get(code)
            if typ is None:
                raise ValueError(f"GEN_DATA: unknown type code {code}")
            out.append(code)
            if code == 0:
                continue
            if code == 13:  # a nibble in a whole byte
                out.append(value)
                continue
            self._one(out, Field("GEN_DATA", typ), typ, value, {})


def encoder(byte_order: str = "<") -> Callable[[str, Mapping[str, Any]], bytes]:
    """``StdfWriter(byte_order).encode`` as a plain function."""
    return StdfWriter(byte_order).encode
