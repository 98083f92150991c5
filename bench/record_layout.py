"""Why records travel as columns (v2, v3) or positional arrays (v1): cbor2 rates per layout.

Encodes the same 20,000 part results as per-record maps, positional arrays (the v1 wire
format) and columns, and prints bytes/record and records per CPU second (median of 9)
for each; then the whole hub decode (body to record objects) of the wire layouts -- v1
rows, v2 columns, v3 columns with typed float columns -- and the hub's check alone
(``check_frame`` and the timestamps: what the ingest does before its commit and ACK), on
those part results and on the benchmark's tester mix (8 parametric results + 1 part
result per part, frames of 8,000 records, the gateway's default), side by side.

    python bench/record_layout.py
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import cbor2

from edgegw.protocol import check_frame, decode_frame, encode_body, encode_columns
from edgegw.records import ParametricResult, PartResult

N = 20_000


def rate(fn: Callable[[], object], n: int = N) -> float:
    """Records per CPU second (process time: a shared machine's waits do not count),
    median of 9."""
    times = []
    for _ in range(9):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return n / statistics.median(times)


def _encode_all(enc: Callable[[int, list[Any]], bytes], chunks: list[list[Any]]) -> object:
    return [enc(1, c) for c in chunks]


def _decode_all(bodies: list[bytes]) -> object:
    return [decode_frame(b, N) for b in bodies]


def _check_all(bodies: list[bytes]) -> object:
    return [check_frame(b, N)[1].timestamps() for b in bodies]


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
        enc_rate = rate(functools.partial(cbor2.dumps, obj))
        dec_rate = rate(functools.partial(cbor2.loads, data))
        print(f"{name:26s} {len(data) / N:9.1f} {enc_rate:13,.0f} {dec_rate:13,.0f}")
    mix: list[Any] = []
    for i in range(N // 9 + 1):
        mix += [ParametricResult("tester", 1.7e9 + i, "LOT1", 1, i % 8, str(i), 100 + t,
                                 f"TEST_{t}", 1.0 + t * 0.01 + i * 1e-6, 0.0, 2.0, "V", True)
                for t in range(8)]
        mix.append(recs[i])
    mix = mix[:N]
    print()
    print(f"{'hub decode (body->records)':26s} {'bytes/rec':>9s} {'encode rec/s':>13s} "
          f"{'decode rec/s':>13s} {'/v1':>5s} {'check rec/s':>12s}")
    typed = functools.partial(encode_columns, typed=True)
    for name, records in (("PRR", recs), ("mix", mix)):
        step = 8000 if name == "mix" else N  # the mix: in frames of 8,000
        chunks = [records[i:i + step] for i in range(0, N, step)]
        out = {}
        encoders: list[tuple[str, Callable[[int, list[Any]], bytes]]] = [
            ("v1 rows", encode_body), ("v2 columns", encode_columns), ("v3 typed", typed)]
        for layout, enc in encoders:
            bodies = [enc(1, c) for c in chunks]
            e = rate(functools.partial(_encode_all, enc, chunks))
            d = rate(functools.partial(_decode_all, bodies))
            c = rate(functools.partial(_check_all, bodies))
            out[layout] = d
            ratio = f"{d / out['v1 rows']:5.2f}" if layout != "v1 rows" else ""
            print(f"{name + ': ' + layout:26.26s} {sum(map(len, bodies)) / N:9.1f} {e:13,.0f} "
                  f"{d:13,.0f} {ratio:>5s} {c:12,.0f}")


if __name__ == "__main__":
    main()
