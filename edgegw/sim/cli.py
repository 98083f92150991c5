"""``edgegw simulate``: a tester writing STDF (default) or sensors publishing to MQTT."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate a tester writing STDF files (default) or sensors publishing MQTT",
        description="Simulate a wafer-sort tester writing STDF files in real time, as a real "
                    "one does (one file per lot, or per wafer), for a gateway's stdf source "
                    "to tail; or, with --sensors, handler and prober sensors publishing "
                    "readings to an MQTT broker (topics ate/<tester>/handler/<quantity> "
                    "and ate/<tester>/prober/<quantity>, JSON {\"value\": .., \"ts\": ..}).  "
                    "--seed fixes what is produced.",
        epilog="examples:\n"
               "  edgegw simulate --out /var/tmp/stdf --lots 3 --wafers 5\n"
               "  edgegw simulate --out /var/tmp/stdf --per-wafer --gzip --sites 8\n"
               "  edgegw simulate --sensors --broker 127.0.0.1:1883 --rate 10 --duration 60")
    p.add_argument("--sensors", action="store_true",
                   help="publish handler/prober sensor readings to an MQTT broker instead")
    p.add_argument("--seed", type=int, default=1,
                   help="random seed: the same seed gives the same results (default: "
                        "%(default)s)")
    p.add_argument("--duration", type=float, default=0.0, metavar="SECONDS",
                   help="stop after this many seconds; 0 = until done or Ctrl-C (default)")
    stdf = p.add_argument_group("STDF tester (default mode)")
    stdf.add_argument("--out", metavar="DIR", help="directory the STDF files are written to")
    stdf.add_argument("--sites", type=int, default=4, metavar="N",
                      help="test sites, 1 to 255: dies tested in parallel (default: "
                           "%(default)s)")
    stdf.add_argument("--parts-per-second", type=float, default=50.0, metavar="N",
                      help="parts tested per second, all sites together (default: "
                           "%(default)s)")
    stdf.add_argument("--tests-per-part", type=int, default=8, metavar="N",
                      help="parametric tests per part (default: %(default)s)")
    stdf.add_argument("--wafers", type=int, default=1, metavar="N",
                      help="wafers per lot (default: %(default)s)")
    stdf.add_argument("--wafer-diameter", type=int, default=20, metavar="DIES",
                      help="dies across the wafer (default: %(default)s)")
    stdf.add_argument("--lot", default="LOT0001", metavar="LOT_ID",
                      help="lot id of the first lot; later lots count up from it (default: "
                           "%(default)s)")
    stdf.add_argument("--byte-order", choices=["little", "big"], default="little",
                      help="byte order of the STDF files: little (a PC, CPU_TYPE 2, the "
                           "default) or big (a Sun, CPU_TYPE 1)")
    stdf.add_argument("--lots", type=int, default=1, metavar="N",
                      help="lots to test, one after the other (default: %(default)s)")
    stdf.add_argument("--per-wafer", action="store_true",
                      help="start a new STDF file per wafer (default: one file per lot)")
    stdf.add_argument("--gzip", action="store_true",
                      help="gzip each STDF file once it is complete (appears as "
                           "NAME.stdf.gz)")
    stdf.add_argument("--yield", dest="yield_", type=float, default=None, metavar="FRACTION",
                      help="base yield of the tester model (default 0.94)")
    stdf.add_argument("--start-time", type=int, default=None, metavar="EPOCH",
                      help="timestamp of the first lot (default: now); fixes the bytes "
                           "with --seed")
    mqtt = p.add_argument_group("sensors (--sensors)")
    mqtt.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT",
                      help="the MQTT broker (default: %(default)s)")
    mqtt.add_argument("--rate", type=float, default=100.0,
                      help="messages per second per sensor (default: %(default)s)")
    mqtt.add_argument("--tester", default="ate-01",
                      help="tester name in the topics (default: %(default)s)")
    mqtt.add_argument("--qos", type=int, choices=[0, 1], default=1,
                      help="MQTT QoS of the messages (default: %(default)s)")
    mqtt.add_argument("--count", type=int, default=0,
                      help="messages per sensor, then stop (default: 0 = no limit)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.sensors:
        from .sensors import main as sensors_main

        return sensors_main(args)
    from .stdf_tester import main as stdf_main

    return stdf_main(args)
