"""The tester-format registry: installed formats (``edgegw.formats`` entry points) by name.

Above every format (it falls back on the built-in STDF when the package metadata is
missing), so the interface in ``edgegw.formats`` stays below them.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from ..formats import ENTRY_POINT_GROUP, TesterFormat


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
