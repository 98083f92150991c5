"""Core subcommands: hub, gateway, demo, check-config."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import trio

from . import sdnotify
from .config import ConfigError, apply_overrides, build, load, read_toml
from .gateway.config import GatewayConfig, load_gateway_config
from .hub.config import HubConfig

log = logging.getLogger("edgegw")


def add_commands(sub: Any) -> None:
    p = sub.add_parser("hub", help="run the hub")
    p.add_argument("--config", metavar="FILE", help="hub TOML (default: built-in defaults)")
    _add_set(p)
    p.set_defaults(func=cmd_hub)

    p = sub.add_parser("gateway", help="run a gateway")
    p.add_argument("--config", metavar="FILE", required=True, help="gateway TOML")
    _add_set(p)
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("check-config", help="validate a gateway or hub TOML file")
    p.add_argument("file")
    _add_set(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("demo", help="hub + gateway + simulated tester in one process")
    p.add_argument("--duration", type=float, default=0.0,
                   help="stop by itself after this many seconds (default: until Ctrl-C)")
    p.add_argument("--port", type=int, default=8765, help="hub port (0 = any free port)")
    p.add_argument("--parts-per-second", type=float, default=200.0)
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--source", choices=["stdf", "records"], default="stdf",
                   help="stdf: the tester writes STDF files the gateway tails (default); "
                        "records: the simulated source produces records directly")
    _add_set(p)
    p.set_defaults(func=cmd_demo)


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config value, e.g. --set hub.port=9000 (repeatable)")


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        data = apply_overrides(read_toml(args.file), args.overrides)
        if "hub" in data or "gateways" in data:
            build(HubConfig, data, args.file)
        elif "gateway" in data:
            cfg = build(GatewayConfig, data, args.file)
            cfg.source_entries(args.file)
        else:
            raise ConfigError([f"{args.file}: <top>: neither a gateway config (needs a "
                               "[gateway] table) nor a hub config (needs a [hub] table)"])
    except ConfigError as exc:
        for line in exc.errors:
            print(line)
        return 2
    print("ok")
    return 0


async def _until_signal(nursery: trio.Nursery) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            nursery.cancel_scope.cancel()
            return


def _serve(service: Any, banner: Callable[[Any], str]) -> int:
    """Run a service until SIGINT/SIGTERM, telling systemd once it is up."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            started = await nursery.start(service.run)
            text = banner(started)
            print(text, flush=True)
            nursery.start_soon(_until_signal, nursery)
            await nursery.start(sdnotify.watchdog)
            await sdnotify.ready(text)

    trio.run(main)
    return 0


def cmd_hub(args: argparse.Namespace) -> int:
    from .hub.app import HubApp

    cfg = load(HubConfig, args.config, args.overrides)
    return _serve(HubApp(cfg),
                  lambda port: f"edgegw hub listening on http://{cfg.hub.listen}:{port}/")


def cmd_gateway(args: argparse.Namespace) -> int:
    from .gateway.service import Gateway

    cfg = load_gateway_config(args.config, args.overrides)
    return _serve(Gateway(cfg), lambda _: f"edgegw gateway {cfg.gateway.id} running, "
                                          f"hub {cfg.gateway.hub_url}")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    summary = trio.run(run_demo, args)
    print(json.dumps(summary, sort_keys=True))
    sys.stdout.flush()
    return 0 if summary["lost"] == 0 and summary["duplicates"] == 0 else 1
