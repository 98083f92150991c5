"""Core subcommands: hub, gateway, demo, check-config.

Exit status (docs/configuration.md): 0 ok, 2 the config is invalid (one line per problem),
3 the service cannot start (one line: port in use, address unknown, directory not
writable, ...), 130 interrupted.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from . import failpoints, sdnotify
from .config import (
    ConfigError,
    add_override_option,
    apply_overrides,
    build,
    load,
    read_toml,
)
from .gateway.config import GatewayConfig, build_gateway_config, load_gateway_config
from .hub.config import HubConfig
from .startup import (
    EXIT_CONFIG,
    DirLock,
    HeldLogs,
    StartupError,
    describe,
    prepare_dir,
    readable,
    resolve,
    service_failure,
)

log = logging.getLogger("edgegw")


EXIT_STATUS = ("exit status: 0 ok, 2 the config is invalid (one line per problem), "
               "3 the service cannot start (one line naming the key), 130 interrupted")


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "hub", help="run the hub",
        description="Run the hub: gateways connect to /ws/gateway; every record is applied "
                    "exactly once to the hub's SQLite store, then to the live state served "
                    "on the same port (dashboard at /, /ws/live, /api/..., /healthz, "
                    "/metrics).  Ctrl-C or SIGTERM stops it cleanly; SIGHUP (systemctl "
                    "reload) reads the TLS files and the config file's [gateways], [auth] "
                    "and [alerts] again.",
        epilog="examples:\n"
               "  edgegw hub --config conf/hub.toml\n"
               "  edgegw hub --config conf/hub.toml --set hub.port=9000 "
               "--set hub.listen=0.0.0.0\n"
               "  edgegw hub        # built-in defaults: no gateway may connect\n\n"
               + EXIT_STATUS)
    p.add_argument("--config", metavar="FILE",
                   help="hub config TOML (docs/configuration.md; default: built-in defaults)")
    add_override_option(p, "hub.port=9000")
    p.set_defaults(func=cmd_hub)

    p = sub.add_parser(
        "gateway", help="run a gateway (one per tester host)",
        description="Run a gateway: read its sources (STDF files a tester writes, MQTT "
                    "sensor feeds, a simulated tester), batch the records into "
                    "sequence-numbered frames, keep them in memory or a crash-safe disk "
                    "spool, and send them to the hub until it acknowledges them.  Ctrl-C or "
                    "SIGTERM stops it cleanly; SIGHUP (systemctl reload) restarts it from "
                    "the config file read again, and a file that does not load changes "
                    "nothing.",
        epilog="examples:\n"
               "  edgegw gateway --config conf/gateway.toml\n"
               "  edgegw gateway --config conf/gateway.toml --set batch.max_records=500 "
               "--set sources.0.sites=8\n\n" + EXIT_STATUS)
    p.add_argument("--config", metavar="FILE", required=True,
                   help="gateway config TOML (docs/configuration.md)")
    add_override_option(p, "batch.max_records=500")
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser(
        "check-config", help="check a hub or gateway config file without running it",
        description="Check a config file without running anything: print which kind of "
                    "config the file was checked as, then \"ok\" or every problem, one line "
                    "each naming the file, the key and what was expected (exit status 2).\n\n"
                    "The kind comes from the file's tables: [hub] or [gateways.<id>] make a "
                    "hub config, [gateway] a gateway config, and a file of [[sources]] tables "
                    "only is a sources fragment to copy into a gateway config (like "
                    "conf/gateway-mqtt.example.toml).  --kind chooses the kind instead.",
        epilog="examples:\n"
               "  edgegw check-config conf/gateway.toml\n"
               "  edgegw check-config conf/gateway.toml --set batch.max_records=500\n"
               "  edgegw check-config conf/hub.toml --set hub.port=9000\n"
               "  edgegw check-config conf/gateway-mqtt.example.toml\n"
               "  edgegw check-config site.toml --kind gateway")
    p.add_argument("file", metavar="FILE", help="the TOML file to check")
    p.add_argument("--kind", choices=KINDS, default=None,
                   help="check the file as this kind of config instead of the kind its "
                        "tables suggest")
    add_override_option(p, "batch.max_records=500 (gateway) or --set hub.port=9000 (hub)")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "demo", help="hub + gateway + simulated tester in one process",
        description="Run a hub, a gateway and a simulated multi-site tester in one process, "
                    "on built-in defaults: no config file, no broker, data in a temporary "
                    "directory removed on exit.  The tester writes STDF files in real time "
                    "and the gateway tails them, as on a tester host; open the dashboard URL "
                    "it prints.  On exit (Ctrl-C, or --duration) it waits for the hub to "
                    "acknowledge everything and prints a JSON summary (produced, received, "
                    "lost, duplicates, ...); exit status 1 if anything was lost or counted "
                    "twice.",
        epilog="examples:\n"
               "  edgegw demo\n"
               "  edgegw demo --duration 10 --port 0\n"
               "  edgegw demo --sites 8 --parts-per-second 500 --set live.ui_rate=5")
    p.add_argument("--duration", type=float, default=0.0, metavar="SECONDS",
                   help="stop by itself after this many seconds (default: until Ctrl-C)")
    p.add_argument("--port", type=int, default=8765,
                   help="the hub's port (default: %(default)s; 0 = any free port)")
    p.add_argument("--parts-per-second", type=float, default=200.0, metavar="N",
                   help="parts the simulated tester tests per second, all sites together "
                        "(default: %(default)s)")
    p.add_argument("--sites", type=int, default=4, metavar="N",
                   help="test sites of the simulated tester (default: %(default)s)")
    p.add_argument("--source", choices=["stdf", "records"], default="stdf",
                   help="stdf: the tester writes STDF files the gateway tails (default); "
                        "records: the simulated source produces records directly")
    add_override_option(p, "live.ui_rate=5 (keys of a hub config go to the hub, the rest to the "
                "gateway)")
    p.set_defaults(func=cmd_demo)


#: the kinds of file check-config knows
KINDS = ("gateway", "hub", "sources")


def config_kind(data: dict[str, Any]) -> tuple[str | None, str]:
    """The kind of config the tables of ``data`` suggest, and why (None: no kind fits)."""
    if "hub" in data:
        return "hub", "it has a [hub] table"
    if "gateways" in data:
        return "hub", "it has [gateways.<id>] tables"
    if {"auth", "tls"} & data.keys():
        return "hub", "it has an [auth] or [tls] table"
    if "gateway" in data:
        return "gateway", "it has a [gateway] table"
    if "sources" in data and set(data) == {"sources"}:
        return "sources", "it holds [[sources]] tables only, to copy into a gateway config"
    return None, ("it has no [gateway] table (a gateway config), no [hub] or [gateways.<id>] "
                  "table (a hub config), and is not [[sources]] tables only (a sources "
                  "fragment)")


def check_config(data: dict[str, Any], origin: str,
                 kind: str | None = None) -> HubConfig | GatewayConfig:
    """What ``check-config`` checks: the ``kind`` of config in ``data`` (default: the kind
    its tables suggest), built, its sources included.  Raises ConfigError listing every
    problem."""
    if kind is None:
        kind, why = config_kind(data)
        if kind is None:
            raise ConfigError([f"{origin}: <top>: not a config edgegw knows: {why}; "
                               "--kind gateway|hub|sources checks it as one"])
    if kind == "hub":
        return build(HubConfig, data, origin)
    if kind == "gateway":
        return build_gateway_config(data, origin)
    if kind == "sources":
        return _check_sources(data, origin)
    raise ValueError(f"unknown config kind {kind!r}")


#: the [gateway] table a sources fragment is checked with (a fragment has none)
_FRAGMENT_GATEWAY = {"id": "sources-fragment", "token": "sources-fragment"}


def _check_sources(data: dict[str, Any], origin: str) -> GatewayConfig:
    """A sources fragment: [[sources]] tables to copy into a gateway config, checked as the
    gateway would check them."""
    errors = [f"{origin}: {key}: unknown key (a sources fragment holds [[sources]] tables "
              "only)" for key in data if key != "sources"]
    if "sources" not in data:
        errors.append(f"{origin}: sources: required key is missing (expected a list of "
                      "[[sources]] tables)")
    try:
        cfg = build_gateway_config({"gateway": _FRAGMENT_GATEWAY,
                                    "sources": data.get("sources", [])}, origin)
    except ConfigError as exc:
        errors.extend(exc.errors)
    if errors:
        raise ConfigError(errors)
    return cfg


def _kind_line(path: str, data: dict[str, Any], forced: str | None) -> tuple[str | None, str]:
    """The kind ``check-config`` checks ``data`` as, and the line saying so."""
    if forced is not None:
        return forced, f"{path}: checked as a {_NAMES[forced]} (--kind {forced})"
    kind, why = config_kind(data)
    if kind is None:
        return None, f"{path}: not checked: {why}; --kind gateway|hub|sources chooses one"
    others = " or ".join(f"--kind {k}" for k in KINDS if k != kind)
    return kind, (f"{path}: checked as a {_NAMES[kind]} ({why}; {others} checks it as "
                  "another kind)")


_NAMES = {"hub": "hub config", "gateway": "gateway config",
          "sources": "sources fragment"}


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        data = read_toml(args.file)
    except ConfigError as exc:
        for line in exc.errors:
            print(line)
        return EXIT_CONFIG
    # the kind comes from the file as written: an override (--set hub.port=...) does not
    # turn a gateway config into a hub config
    kind, line = _kind_line(args.file, data, args.kind)
    print(line)
    if kind is None:
        return EXIT_CONFIG
    try:
        cfg = check_config(apply_overrides(data, args.overrides), args.file, kind)
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
    failpoints.hit("service.starting")
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
            failed = service_failure(exc)
            if failed is None:
                raise
            log.debug("stopped", exc_info=exc)  # the whole story with -vv
            raise failed from None
        log.debug("start-up failed", exc_info=exc)  # the whole story with -vv
        raise StartupError(describe(exc, listen)) from None
    return 0


def cmd_hub(args: argparse.Namespace) -> int:
    cfg = load(HubConfig, args.config, args.overrides)
    h = cfg.hub
    resolve("hub.listen", h.listen, h.port)
    prepare_dir("hub.data_dir", h.data_dir)
    scheme = "https" if cfg.tls.enabled else "http"
    service: Any
    lock = None
    if h.cluster is None:
        # one hub per data directory, for the life of this process: a second one would
        # apply and acknowledge by applied sets it read at its start (docs/storage.md)
        lock = DirLock(Path(h.data_dir), "hub.data_dir", "hub")
        lock.acquire()
    if h.cluster is not None:
        # one node of a hub cluster on PostgreSQL and Redis (docs/cluster.md)
        from .hub.cluster.node import ClusterHub

        service = ClusterHub(cfg)
        what = f"edgegw hub cluster node {service.node_id}"
    else:
        from .hub.app import Hub

        service = Hub(cfg)
        what = "edgegw hub"
    if args.config is not None:
        # SIGHUP reads the file again and takes its [gateways] table (edgegw/hub/reload.py)
        service.ingest.reloader.config_source = functools.partial(load, HubConfig, args.config,
                                                         args.overrides)
    try:
        return _serve(service, lambda port: f"{what} listening on {scheme}://{h.listen}:{port}/",
                      listen=("hub.listen/hub.port", h.listen, h.port))
    finally:
        if lock is not None:
            lock.release()


def check_gateway_start(cfg: GatewayConfig) -> None:
    """What ``edgegw gateway`` checks of a config before starting from it (at its start
    and on SIGHUP): its directories, the status address, the uplink's TLS files; a
    StartupError names the key at fault."""
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


def cmd_gateway(args: argparse.Namespace) -> int:
    from .gateway import GatewayReloader, tune_gc

    cfg = load_gateway_config(args.config, args.overrides)
    check_gateway_start(cfg)
    g = cfg.gateway
    listen = ("gateway.status_listen/status_port", g.status_listen, g.status_port)
    tune_gc()  # this process is the gateway's own
    # SIGHUP (systemctl reload) reads the file again and restarts the gateway from it in
    # this process; a file that does not load leaves the running one (gateway/sighup.py)
    service = GatewayReloader(cfg, functools.partial(load_gateway_config, args.config,
                                                     args.overrides), check_gateway_start)
    return _serve(service, lambda _: f"edgegw gateway {g.id} running, hub {g.hub_url}",
                  listen=listen if g.status_port else None)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    summary = trio.run(run_demo, args)
    print(json.dumps(summary, sort_keys=True))
    sys.stdout.flush()
    return 0 if summary["lost"] == 0 and summary["duplicates"] == 0 else 1


__all__ = ["KINDS", "check_config"]
