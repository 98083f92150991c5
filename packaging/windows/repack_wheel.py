"""Repack edgegw's wheel for win_amd64: the Linux extension out, the .pyd in, the tag and
RECORD rewritten (the wheel format's two files that name platform and contents).

    python packaging/windows/repack_wheel.py LINUX_WHEEL ACCEL_PYD OUTDIR

Part of packaging/build-windows-wheel.sh; prints the Windows wheel's path.  Written out
rather than done with the ``wheel`` tool: the repack needs nothing installed.
"""
from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

src, pyd, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
name, version = src.name.split("-")[:2]
dest = out / f"{name}-{version}-cp311-abi3-win_amd64.whl"
records = []

def digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
    record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
    files = [(n, zin.read(n)) for n in zin.namelist()
             if n != record_name and not n.startswith("edgegw/stdf/_accel.")]
    files.append(("edgegw/stdf/_accel.pyd", pyd.read_bytes()))
    for n, data in files:
        if n.endswith(".dist-info/WHEEL"):
            lines = [line for line in data.decode().splitlines()
                     if line and not line.startswith("Tag:")]
            data = ("\n".join(lines) + "\nTag: cp311-abi3-win_amd64\n").encode()
        zout.writestr(n, data)
        records.append(f"{n},sha256={digest(data)},{len(data)}")
    records.append(f"{record_name},,")
    zout.writestr(record_name, "\n".join(records) + "\n")
print(dest)
