"""Check: this tree's STDF decoder gives exactly what another tree's gives (main's, say),
on every real file in ``shared/data/stdf`` and every shape of ``bench/stdf_corpus.py``.

Each side, in its own process, decodes every file as rows and as dict records, with the
tail memo (and GDR layouts) on and off, in one feed and in 64 KiB chunks, and prints a
SHA-256 digest of the ``repr`` of every record (floats as their bits, so NaN payloads
and -0.0 count) per file and way; the digests must be the same on both sides.  The
tests hold the decoder to the reference decoder and pystdf; this holds a speed change
to the decoder it replaces, record for record.

    python bench/stdf_same.py DIR     # DIR: e.g. ``git archive main | tar -x -C DIR``
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stdf_corpus import SHAPES
from stdf_decode import shared_data

CHILD = r"""
import gzip, hashlib, importlib.machinery, struct, sys
paths, src = sys.argv[1:-1], sys.argv[-1]
if src:
    sys.path.insert(0, src)
    sys.meta_path.insert(0, importlib.machinery.PathFinder)
from edgegw.stdf import StdfDecoder
from edgegw.stdf.decoder import MEMO_SIZE, set_tail_memo
assert src in __import__('edgegw').__file__, 'wrong edgegw imported'

def bits(value):
    if isinstance(value, float):
        return struct.pack('>d', value)
    if isinstance(value, (list, tuple)):
        return [bits(v) for v in value]
    if isinstance(value, dict):
        return {k: bits(v) for k, v in value.items()}
    return value

for path in paths:
    data = open(path, 'rb').read()
    data = gzip.decompress(data) if data[:2] == b'\x1f\x8b' else data
    for memo in (MEMO_SIZE, 0):
        set_tail_memo(memo)
        for rows in (True, False):
            for chunk in (len(data), 65536):
                dec = StdfDecoder(keep_unknown=True)
                digest = hashlib.sha256()
                count = 0
                for start in range(0, len(data), chunk):
                    dec.feed(data[start:start + chunk])
                    for record in (dec.rows() if rows else dec.records()):
                        digest.update(repr(bits(tuple(record))).encode())
                        count += 1
                print(path.rsplit('/', 1)[-1], 'memo' if memo else 'nomemo',
                      'rows' if rows else 'dicts', chunk, count, dec.buffered,
                      digest.hexdigest()[:16])
"""


def digests(paths: list[str], src: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", CHILD, *paths, src], check=True,
                         capture_output=True, text=True).stdout
    return out.splitlines()


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    ref = str(Path(sys.argv[1]).resolve())
    with tempfile.TemporaryDirectory(prefix="stdf-same-") as tmp:
        paths = [str(p) for p in sorted(shared_data().glob("*"))
                 if p.is_file() and not p.name.endswith(".md")]
        for name, build in SHAPES.items():
            path = Path(tmp) / f"{name}.stdf"
            path.write_bytes(build())
            paths.append(str(path))
        ours, theirs = digests(paths, ""), digests(paths, ref)
    differ = [(a, b) for a, b in zip(ours, theirs, strict=True) if a != b]
    for line in ours:
        print(line)
    for a, b in differ:
        print(f"DIFFERENT: this {a} / {os.path.basename(ref)} {b}")
    print(f"{len(ours)} digests, {len(differ)} different")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
