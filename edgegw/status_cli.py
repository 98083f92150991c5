"""``edgegw status``: is this workstation's gateway running, is it reaching the hub, and
how much waits in its spool -- one screen, from its status port.

A test-floor engineer at a tester whose results do not show at the hub asks the gateway,
not the hub (which cannot say why a gateway does not come): this reads the gateway's
config (the packaged service's by default) for its status port, asks it ``/healthz`` and
``/api/stats`` and prints what matters, with the exit status a script or a monitoring
check can use: 0 running, healthy and connected; 1 running but not connected to the hub
or unhealthy (its frames wait in the spool: nothing lost), or frames or records refused
since its start (in its dead-letter file: the hub will not have them unless someone acts);
2 the config does not load; 3 not running (nothing answers on the status port) or no
status port configured.

``summarize`` is the pure part (the two answers in, lines and a status out).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from .config import add_override_option

#: the packaged service's config (packaging/systemd, the WinSW service of packaging/windows)
DEFAULT_CONFIG = (r"C:\edgegw\gateway.toml" if sys.platform == "win32"
                  else "/etc/edgegw/gateway.toml")

OK, DEGRADED, NOT_RUNNING = 0, 1, 3


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "status", help="is the gateway running and reaching its hub; what waits in its spool",
        description="Ask a running gateway (its status port: gateway.status_port, "
                    "gateway.status_listen) how it is: whether it is connected to the hub "
                    "(or the last error), what waits in its spool, the records its sources "
                    "put and the frames the hub rejected.  Exit status: 0 running, healthy "
                    "and connected; 1 running but not connected or unhealthy; 2 the config "
                    "does not load; 3 not running, or no status port.  Status 1 also when frames "
                    "or records were refused since its start (its dead-letter file).",
        epilog="examples:\n"
               f"  edgegw status                                # {DEFAULT_CONFIG}\n"
               "  edgegw status --config conf/gateway.toml --set gateway.status_port=9100\n"
               "  edgegw status --url http://127.0.0.1:9100 --json")
    p.add_argument("--config", metavar="FILE",
                   help=f"the gateway's config (default: {DEFAULT_CONFIG}, the packaged "
                        "service's)")
    add_override_option(p, "gateway.status_port=9100")
    p.add_argument("--url", metavar="URL",
                   help="the status port's address instead of the config's "
                        "(http://HOST:PORT)")
    p.add_argument("--json", action="store_true",
                   help="print the gateway's answers as one JSON object")
    p.add_argument("--timeout", type=float, default=3.0, metavar="S",
                   help="seconds to wait for an answer (default 3)")
    p.set_defaults(func=run_status)


def status_url(args: argparse.Namespace) -> str | None:
    """The status port's base URL: ``--url``, else from the config (None: the config
    has no status port)."""
    if args.url:
        return str(args.url).rstrip("/")
    from .gateway import load_gateway_config

    cfg = load_gateway_config(args.config or DEFAULT_CONFIG, args.overrides)
    g = cfg.gateway
    if not g.status_port:
        return None
    host = g.status_listen
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{g.status_port}"


def _get(url: str, timeout: float) -> tuple[int, Any]:
    """(HTTP status, the JSON answer) of a GET; an HTTP error's body is read too (an
    unhealthy gateway's /healthz answers 503 with its reason)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        with exc:
            body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, {"detail": body.decode(errors="replace")[:200]}


def summarize(health: dict[str, Any], stats: dict[str, Any]) -> tuple[list[str], int]:
    """The lines to print and the exit status, from a gateway's ``/healthz`` and
    ``/api/stats`` answers."""
    healthy = health.get("status") == "ok"
    connected = bool(stats.get("connected"))
    lines = [f"gateway {stats.get('gateway', '?')}: running, "
             + ("healthy" if healthy else f"UNHEALTHY: {health.get('detail', '?')}")]
    if connected:
        lines.append("hub:      connected")
    else:
        why = stats.get("last_error") or "no connection yet"
        lines.append(f"hub:      NOT CONNECTED ({why}); frames wait in the store until it is")
    store = stats.get("store") or {}
    frames = store.get("frames", 0)
    if store.get("kind") == "disk":
        used, cap = store.get("bytes", 0), store.get("max_bytes") or 0
        share = f", {100 * used / cap:.1f} % of spool.max_bytes" if cap else ""
        waiting = (f"frames {store.get('first_unacked')}..{store.get('next_seq', 1) - 1} "
                   "not yet acknowledged" if frames else "everything acknowledged")
        lines.append(f"spool:    {frames:,} frame(s) waiting, {_size(used)} on disk{share}: "
                     f"{waiting}")
        if store.get("disk_full"):
            lines.append("          the disk is FULL: sources wait for room")
        lines.append(f"          {store.get('dir')} (epoch {store.get('epoch')})")
    else:
        lines.append(f"queue:    {frames:,} frame(s) waiting in memory (no [spool]: lost if "
                     f"the gateway stops before the hub has them)")
    metrics = stats.get("metrics") or {}
    records = _by_label(metrics.get("gateway_records_in_total"), "source")
    if records:
        lines.append("records:  " + "; ".join(f"{name} {n:,}" for name, n in records)
                     + " put by sources since the start")
    rejected = int(_total(metrics.get("uplink_frames_rejected_total")))
    refused = int(_total(metrics.get("gateway_records_rejected_total")))
    kept = int(_total(metrics.get("gateway_dead_letter_bytes")))
    if rejected or refused or kept:
        lines.append(f"rejected: {rejected:,} frame(s) rejected by the hub, {refused:,} "
                     f"record(s) refused since the start; dead-letter file {_size(kept)} "
                     "(edgegw dead-letters list)")
    held = _total(metrics.get("uplink_dead_letter_full")) > 0
    if held:
        lines.append("HELD:     the dead-letter file is over gateway.dead_letter_max_bytes: "
                     "no frame is sent until it is smaller (docs/spool.md)")
    # frames or records the hub will never have unless someone acts (requeue once mended)
    attention = rejected or refused or held
    return lines, OK if healthy and connected and not attention else DEGRADED


def _by_label(values: Any, label: str) -> list[tuple[str, int]]:
    """A labelled counter of ``Metrics.as_dict`` as (label value, count), summed."""
    if not isinstance(values, dict):
        return []
    out: dict[str, int] = {}
    for key, n in values.items():
        labels = dict(part.split("=", 1) for part in key.split(",") if "=" in part)
        name = labels.get(label, "?")
        out[name] = out.get(name, 0) + int(n)
    return sorted(out.items())


def _total(values: Any) -> float:
    if isinstance(values, (int, float)):
        return float(values)
    if isinstance(values, dict):
        return float(sum(v for v in values.values() if isinstance(v, (int, float))))
    return 0.0


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} GB"


def run_status(args: argparse.Namespace) -> int:
    url = status_url(args)
    if url is None:
        print(f"{args.config or DEFAULT_CONFIG}: gateway.status_port is 0 (off): the "
              "gateway serves no status to ask; set it (e.g. 9100) and restart or reload "
              "it, or give --url", file=sys.stderr)
        return NOT_RUNNING
    try:
        _, health = _get(f"{url}/healthz", args.timeout)
        code, stats = _get(f"{url}/api/stats", args.timeout)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"no gateway answers at {url} ({reason}): not running, or another status "
              "port", file=sys.stderr)
        return NOT_RUNNING
    if code != 200:
        print(f"{url}/api/stats answered {code}: {stats.get('detail', stats)} (its Host "
              "rule: gateway.status_allowed_hosts)", file=sys.stderr)
        return NOT_RUNNING
    lines, status = summarize(health, stats)
    if args.json:
        print(json.dumps({"url": url, "health": health, "stats": stats}, sort_keys=True))
    else:
        print("\n".join(lines))
    return status


__all__ = ["DEFAULT_CONFIG", "add_commands", "run_status", "status_url", "summarize"]
