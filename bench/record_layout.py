"""Why records travel as positional arrays: cbor2 encode/decode rates per layout.

Encodes the same 20,000 part results as per-record maps, positional arrays (the wire
format) and columns, and prints bytes/record and records/s (median of 5) for each.

    python bench/record_layout.py
"""

from __future__ import annotations

import statistics
import time

import cbor2

from edgegw.protocol import decode_body, encode_body
from edgegw.records import PartResult, from_wire

N = 20_000


def rate(fn, n: int = N) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def main() -> None:
    recs = [PartResult("tester", 1.7e9 + i, "LOT1", "W1", 1, i % 8, str(i), i % 50, i // 50,
                       1, 1, True, False, 0, 120, 8) for i in range(N)]
    layouts = {
        "map per record": [r._asdict() for r in recs],
        "array per record (wire)": [[5, 0, *r[1:]] for r in recs],
        "columns": [list(c) for c in zip(*recs, strict=True)],
    }
    print(f"{'layout':26s} {'bytes/rec':>9s} {'encode rec/s':>13s} {'decode rec/s':>13s}")
    for name, obj in layouts.items():
        data = cbor2.dumps(obj)
        enc = rate(lambda obj=obj: cbor2.dumps(obj))
        dec = rate(lambda data=data: cbor2.loads(data))
        print(f"{name:26s} {len(data) / N:9.1f} {enc:13,.0f} {dec:13,.0f}")
    body = encode_body(1, recs)

    def hub_decode() -> list[object]:
        _, sources, wire = decode_body(body, N)
        return [from_wire(item, sources) for item in wire]

    full = rate(hub_decode)
    print(f"{'hub: decode + rebuild':26s} {len(body) / N:9.1f} {'':13s} {full:13,.0f}")


if __name__ == "__main__":
    main()
