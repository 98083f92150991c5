"""Core subcommands: hub, gateway, demo, check-config.

Exit status (docs/configuration.md): 0 ok, 2 the config is invalid (one line per problem),
3 the service cannot start (one line: port in use, address unknown, directory not
writable, ...), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from . import sdnotify
from .config import ConfigError, apply_overrides, build, load, read_toml
from .gateway.config import GatewayConfig, build_gateway_config, load_gateway_config
from .hub.config import HubConfig
from .startup import (
    EXIT_CONFIG,
    HeldLogs,
    StartupError,
    describe,
    prepare_dir,
    readable,
    resolve,
)

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


def check_config(data: dict[str, Any], origin: str) -> HubConfig | GatewayConfig:
    """What ``check-config`` checks: the hub or gateway config in ``data``, built, its
    sources included.  Raises ConfigError listing every problem."""
    if {"hub", "gateways", "auth", "tls"} & data.keys():
        return build(HubConfig, data, origin)
    if "gateway" in data:
        return build_gateway_config(data, origin)
    raise ConfigError([f"{origin}: <top>: neither a gateway config (needs a [gateway] "
                       "table) nor a hub config (needs a [hub] table)"])


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = check_config(apply_overrides(read_toml(args.file), args.overrides), args.file)
    except ConfigError as exc:
        for line in exc.errors:
            print(line)
        return EXIT_CONFIG
    print("ok")
    if isinstance(cfg, HubConfig):
        from .auth.hub import secure_by_default_problem

        problem = secure_by_default_problem(cfg)
        if problem:  # valid, but `edgegw hub` will refuse it: say so now
            print(f"warning: edgegw hub will not start: {problem}", file=sys.stderr)
    return 0


async def _until_signal(nursery: trio.Nursery) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            nursery.cancel_scope.cancel()
            return


def _serve(service: Any, banner: Callable[[Any], str],
           listen: tuple[str, str, int] | None = None) -> int:
    """Run a service until SIGINT/SIGTERM, telling systemd once it is up.  Anything that
    stops it before it is ready is a StartupError (one line; ``listen`` names the
    listening socket's keys, host and port for bind errors)."""
    ready = False
    held = HeldLogs()

    async def main() -> None:
        nonlocal ready
        async with trio.open_nursery() as nursery:
            started = await nursery.start(service.run)
            ready = True
            held.pass_on()
            text = banner(started)
            print(text, flush=True)
            nursery.start_soon(_until_signal, nursery)
            await nursery.start(sdnotify.watchdog)
            await sdnotify.ready(text)

    try:
        with held:
            trio.run(main)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        if ready:
            raise
        log.debug("start-up failed", exc_info=exc)  # the whole story with -vv
        raise StartupError(describe(exc, listen)) from None
    return 0


def cmd_hub(args: argparse.Namespace) -> int:
    from .hub.app import HubApp

    cfg = load(HubConfig, args.config, args.overrides)
    h = cfg.hub
    resolve("hub.listen", h.listen, h.port)
    prepare_dir("hub.data_dir", h.data_dir)
    scheme = "https" if cfg.tls.enabled else "http"
    return _serve(HubApp(cfg), lambda port: f"edgegw hub listening on {scheme}://{h.listen}:{port}/",
                  listen=("hub.listen/hub.port", h.listen, h.port))


def cmd_gateway(args: argparse.Namespace) -> int:
    from .gateway.service import Gateway

    cfg = load_gateway_config(args.config, args.overrides)
    g = cfg.gateway
    prepare_dir("gateway.state_dir", g.state_dir)
    if cfg.spool is not None:
        if cfg.spool.dir:
            prepare_dir("spool.dir", cfg.spool.dir)
        else:
            prepare_dir("gateway.state_dir (its spool/)", Path(g.state_dir) / "spool")
    if g.status_port:
        resolve("gateway.status_listen", g.status_listen, g.status_port)
    if g.hub_url.startswith("wss://"):
        for key in ("ca_file", "cert_file", "key_file"):
            if getattr(cfg.uplink, key):
                readable(f"uplink.{key}", getattr(cfg.uplink, key))
    listen = ("gateway.status_listen/status_port", g.status_listen, g.status_port)
    return _serve(Gateway(cfg), lambda _: f"edgegw gateway {g.id} running, hub {g.hub_url}",
                  listen=listen if g.status_port else None)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    summary = trio.run(run_demo, args)
    print(json.dumps(summary, sort_keys=True))
    sys.stdout.flush()
    return 0 if summary["lost"] == 0 and summary["duplicates"] == 0 else 1
