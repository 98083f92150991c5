"""``edgegw plugins``: the tester formats and source types installed, and where they come from.

Both are entry-point groups (``edgegw.formats``, ``edgegw.sources``); a plugin package
that fails to import is listed with its error instead of silently missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .formats import ENTRY_POINT_GROUP as FORMATS_GROUP
from .sources import ENTRY_POINT_GROUP as SOURCES_GROUP


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "plugins", help="list the installed tester formats and source types",
        description="List the tester formats (entry-point group edgegw.formats) and source "
                    "types (edgegw.sources) installed in this Python, with the package each "
                    "comes from; a plugin that fails to import is listed with its error "
                    "(docs/plugins.md).",
        epilog="examples:\n  edgegw plugins\n  edgegw plugins --json")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=_run)


def _describe(ep: EntryPoint, kind: str) -> dict[str, Any]:
    dist = ep.dist
    item: dict[str, Any] = {
        "name": ep.name, "entry_point": ep.value,
        "package": f"{dist.name} {dist.version}" if dist is not None else None,
    }
    try:
        obj = ep.load()
    except Exception as exc:  # show a broken plugin, never crash the listing
        item["error"] = f"{type(exc).__name__}: {exc}"
        return item
    if kind == "format":
        fmt = obj() if isinstance(obj, type) else obj
        item["description"] = getattr(fmt, "description", "")
        item["suffixes"] = list(getattr(fmt, "suffixes", ()))
    else:
        # the class docstring, else its module's: the first line says what it is
        module = sys.modules.get(getattr(obj, "__module__", ""))
        doc = (obj.__doc__ or getattr(module, "__doc__", None) or "").strip().splitlines()
        item["description"] = doc[0] if doc else ""
        alias_of = getattr(obj, "aliases", {}).get(ep.name)
        if alias_of:
            item["alias_of"] = alias_of
            item["description"] = f"alias of {alias_of!r}: {item['description']}"
    return item


def plugin_listing() -> dict[str, list[dict[str, Any]]]:
    """Every installed format and source type, sorted by name."""
    return {
        "formats": [_describe(ep, "format")
                    for ep in sorted(entry_points(group=FORMATS_GROUP), key=lambda e: e.name)],
        "sources": [_describe(ep, "source")
                    for ep in sorted(entry_points(group=SOURCES_GROUP), key=lambda e: e.name)],
    }


def _run(args: argparse.Namespace) -> int:
    listing = plugin_listing()
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    for title, key, group in (("Tester formats", "formats", FORMATS_GROUP),
                              ("Source types", "sources", SOURCES_GROUP)):
        print(f"{title} (entry-point group {group}):")
        if not listing[key]:
            print("  (none)")
        for item in listing[key]:
            if "error" in item:
                print(f"  {item['name']:<10} BROKEN  {item['entry_point']}: {item['error']}")
                continue
            suffixes = " ".join(item.get("suffixes", []))
            line = f"  {item['name']:<10} {item['description']}"
            if suffixes:
                line += f"  [{suffixes}]"
            print(f"{line}  ({item['package']})")
    return 0


__all__ = ["plugin_listing"]
