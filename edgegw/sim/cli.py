"""``edgegw simulate``: a tester writing STDF (default) or sensors publishing to MQTT."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate a tester writing STDF files (default) or sensors publishing MQTT",
    )
    p.add_argument("--sensors", action="store_true",
                   help="publish handler/prober sensor readings to an MQTT broker instead")
    # STDF mode
    p.add_argument("--out", metavar="DIR", help="directory the STDF files are written to")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--parts-per-second", type=float, default=50.0)
    p.add_argument("--tests-per-part", type=int, default=8)
    p.add_argument("--wafers", type=int, default=1)
    p.add_argument("--wafer-diameter", type=int, default=20, help="dies across the wafer")
    p.add_argument("--lot", default="LOT0001")
    p.add_argument("--byte-order", choices=["little", "big"], default="little")
    p.add_argument("--lots", type=int, default=1, help="lots to test, one after the other")
    p.add_argument("--per-wafer", action="store_true",
                   help="start a new STDF file per wafer (default: one file per lot)")
    p.add_argument("--gzip", action="store_true",
                   help="gzip each STDF file once it is complete (appears as NAME.stdf.gz)")
    p.add_argument("--yield", dest="yield_", type=float, default=None, metavar="FRACTION",
                   help="base yield of the tester model (default 0.94)")
    p.add_argument("--start-time", type=int, default=None, metavar="EPOCH",
                   help="timestamp of the first lot (default: now); fixes the bytes with --seed")
    # sensor mode
    p.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT (sensor mode)")
    p.add_argument("--rate", type=float, default=100.0, help="messages/s per channel (sensor mode)")
    p.add_argument("--tester", default="ate-01", help="tester name in the topic (sensor mode)")
    p.add_argument("--qos", type=int, choices=[0, 1], default=1)
    p.add_argument("--count", type=int, default=0,
                   help="messages per sensor, then stop (sensor mode; 0 = no limit)")
    # both
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", type=float, default=0.0, help="seconds; 0 = until done / Ctrl-C")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.sensors:
        from .sensors import main as sensors_main

        return sensors_main(args)
    from .stdf_tester import main as stdf_main

    return stdf_main(args)
