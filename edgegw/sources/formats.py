"""The tester-format registry: installed formats (``edgegw.formats`` entry points) by name.

Above every format (it falls back on the built-in STDF when the package metadata is
missing), so the interface in ``edgegw.formats`` stays below them.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from ..config import ConfigError, build
from ..formats import ENTRY_POINT_GROUP, FormatParser, TesterFormat


class UnknownFormat(LookupError):
    pass


def installed_formats() -> dict[str, TesterFormat]:
    """Every installed tester format, by name (entry-point name)."""
    found: dict[str, TesterFormat] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception:  # a broken plugin must not take the gateway down
            continue
        found[ep.name] = obj() if isinstance(obj, type) else obj
    if "stdf" not in found:  # running from a source tree without the entry points
        from ..stdf.format import STDF

        found["stdf"] = STDF
    return found


def get_format(name: str) -> TesterFormat:
    """The installed format ``name``; the error names every installed one."""
    formats = installed_formats()
    try:
        return formats[name]
    except KeyError:
        raise UnknownFormat(
            f"unknown tester format {name!r} (installed formats: {', '.join(sorted(formats))})"
        ) from None


def build_options(fmt: TesterFormat, raw: dict[str, Any] | None,
                  origin: str = "<config>", prefix: str = "options") -> Any:
    """``raw`` (a source's ``options`` table) built into ``fmt.Options``; None for a format
    without ``Options`` given no options.  Raises ``edgegw.config.ConfigError`` naming each
    bad key (``prefix`` is the table's dotted key, for the messages)."""
    cls = getattr(fmt, "Options", None)
    if cls is None:
        if raw:
            raise ConfigError([f"{origin}: {prefix}: the {fmt.name} format takes no options "
                               f"(got {', '.join(sorted(raw))})"])
        return None
    return build(cls, dict(raw or {}), origin, prefix)


def new_parser(fmt: TesterFormat, options: Any = None) -> FormatParser:
    """A parser of ``fmt`` for one file.  ``options``: the format's ``Options`` instance, or
    a dict to build one from (``build_options``); ignored for a format without
    ``Options``."""
    if getattr(fmt, "Options", None) is None:
        return fmt.new_parser()
    if options is None or isinstance(options, dict):
        options = build_options(fmt, options)
    return fmt.new_parser(options)  # type: ignore[call-arg]


def is_complete(parser: FormatParser) -> bool:
    """The parser says its file is whole (its optional ``complete``)."""
    return bool(getattr(parser, "complete", False))
