"""TOML configuration into typed, frozen dataclasses.

Every error names the file, the dotted key and what was expected, so that a broken
config gives one clear line instead of a traceback.  Sections are plain dataclasses;
the loader walks their type hints, so a new section (a source type in a plugin, say)
needs no change here.

A numeric key declares its allowed values on its type, where the reader (and the schema
walk in ``iter_keys``, which the docs test and the config property test use) can see them::

    port: Annotated[int, Range(1, 65535)] = 8765

Every number is also checked for what TOML allows and the services need: floats finite
(no ``nan``/``inf``), integers within 64 bits.  Checks that relate several keys stay in
the section's ``validate()``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import tomllib  # Python >= 3.11; the tomli fallback is only declared for older builds
import types
import typing
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from .unicodetext import is_unicode

T = TypeVar("T")

#: each config class's resolved type hints: the modules use ``from __future__ import
#: annotations``, so resolving evaluates every hint's string, and a config is built often
#: (every check, every --set, every test example)
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """``get_type_hints(cls, include_extras=True)``, resolved once per class."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = get_type_hints(cls, include_extras=True)
    return hints


class ConfigError(Exception):
    """One or more configuration errors; ``str()`` is one line per error."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


INT64 = (-(1 << 63), (1 << 63) - 1)  # TOML integers are 64-bit


def _num(v: float) -> str:
    if isinstance(v, int) or (v.is_integer() and abs(v) < 1e15):
        return str(int(v))
    return repr(v)


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric key may take: ``lo`` to ``hi``, both inclusive unless
    ``lo_open`` (then "> lo"); ``also`` is one more value outside that span with a meaning
    of its own (0 = "off", "any free port", "keep forever"; the key's docs say which)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    also: float | None = None

    def __contains__(self, v: float) -> bool:
        if self.also is not None and v == self.also:
            return True
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or v <= self.hi

    def describe(self) -> str:
        """The range as the docs and the error messages write it: ``1 to 65535``,
        ``>= 1``, ``> 0 and <= 3600``, ``0 or 0.1 to 3600``."""
        if self.lo is not None and self.hi is not None:
            span = (f"> {_num(self.lo)} and <= {_num(self.hi)}" if self.lo_open
                    else f"{_num(self.lo)} to {_num(self.hi)}")
        elif self.lo is not None:
            span = f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        elif self.hi is not None:
            span = f"<= {_num(self.hi)}"
        else:
            span = "any"
        return span if self.also is None else f"{_num(self.also)} or {span}"


def _unannotate(tp: Any) -> tuple[Any, Range | None]:
    """``Annotated[int, Range(...)]`` -> (int, the Range); anything else -> (tp, None)."""
    if get_origin(tp) is Annotated:
        base, *meta = get_args(tp)
        return base, next((m for m in meta if isinstance(m, Range)), None)
    return tp, None


def _describe(tp: Any, raw: Any = None) -> str:
    """What ``tp`` accepts, in words; ``raw`` (the value found) only sharpens the wording."""
    base, rng = _unannotate(tp)
    if rng is not None:
        span = rng.describe()
        if span == "any":
            return _describe(base, raw)
        finite = base is float and isinstance(raw, float) and not math.isfinite(raw)
        return f"{'a finite number' if finite else _describe(base)} {span}"
    if tp is float and isinstance(raw, float) and not math.isfinite(raw):
        return "a finite number"
    if tp is int and isinstance(raw, int) and not INT64[0] <= raw <= INT64[1]:
        return "an integer within 64 bits"
    origin = get_origin(tp)
    if tp is type(None):
        return "nothing"
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp) if a is not type(None))
    if origin is list or (origin is tuple and get_args(tp)[-1:] == (...,)):
        return f"a list of {_describe(get_args(tp)[0])}"
    if origin is dict:
        value_tp = get_args(tp)[1]
        return "a table" if value_tp is Any else f"a table of {_describe(value_tp)}"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


class _Builder:
    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.errors: list[str] = []

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.origin}: {key or '<top>'}: {message}")

    def value(self, tp: Any, raw: Any, key: str) -> Any:
        base, rng = _unannotate(tp)
        if rng is not None:  # a number with a Range: one message saying both
            sub = _Builder(self.origin)
            out = sub.value(base, raw, key)
            if sub.errors or out not in rng:
                self.error(key, f"expected {_describe(tp, raw)}, got {_show(raw)}")
                return None
            return out
        origin = get_origin(tp)
        if tp is Any:
            return raw
        if origin in (typing.Union, types.UnionType):
            args = get_args(tp)
            if raw is None and type(None) in args:
                return None
            others = [a for a in args if a is not type(None)]
            if len(others) == 1:  # Optional[X]: X's own errors, naming the real key
                return self.value(others[0], raw, key)
            for arg in args:
                if arg is type(None):
                    continue
                sub = _Builder(self.origin)
                out = sub.value(arg, raw, key)
                if not sub.errors:
                    return out
            self.error(key, f"expected {_describe(tp)}, got {_show(raw)}")
            return None
        if origin is Literal:
            if raw in get_args(tp):
                return raw
            self.error(key, f"expected {_describe(tp)}, got {_show(raw)}")
            return None
        if origin is list:
            if not isinstance(raw, list):
                self.error(key, f"expected {_describe(tp)}, got {_show(raw)}")
                return []
            (item_tp,) = get_args(tp)
            return [self.value(item_tp, v, f"{key}[{i}]") for i, v in enumerate(raw)]
        if origin is tuple:  # TOML has arrays only: tuple[X, ...] is read from one
            args = get_args(tp)
            if not isinstance(raw, (list, tuple)) or (
                    args[-1:] != (...,) and len(raw) != len(args)):
                self.error(key, f"expected {_describe(tp)}, got {_show(raw)}")
                return ()
            item_tps = [args[0]] * len(raw) if args[-1:] == (...,) else list(args)
            return tuple(self.value(t, v, f"{key}[{i}]")
                         for i, (t, v) in enumerate(zip(item_tps, raw, strict=True)))
        if origin is dict:
            if not isinstance(raw, dict):
                self.error(key, f"expected {_describe(tp)}, got {_show(raw)}")
                return {}
            _, val_tp = get_args(tp)
            return {k: self.value(val_tp, v, f"{key}.{k}") for k, v in raw.items()}
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.section(tp, raw, key)
        if tp is float:
            if (isinstance(raw, (int, float)) and not isinstance(raw, bool)
                    and math.isfinite(raw)):
                return float(raw)
        elif tp is int:
            if isinstance(raw, int) and not isinstance(raw, bool):
                if INT64[0] <= raw <= INT64[1]:
                    return raw
        elif isinstance(tp, type) and isinstance(raw, tp):
            if isinstance(raw, str) and not is_unicode(raw):
                # (only a --set can: TOML text is Unicode) a shell in another encoding
                self.error(key, f"expected text, got {_show(raw)}: bytes that are not UTF-8 "
                                "(a --set typed in another encoding?)")
                return None
            return raw
        self.error(key, f"expected {_describe(tp, raw)}, got {_show(raw)}")
        return None

    def section(self, cls: type[T], raw: Any, key: str) -> T:
        if not isinstance(raw, dict):
            self.error(key, f"expected a table, got {_show(raw)}")
            raw = {}
        before = len(self.errors)
        hints = _hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {}
        for name in raw:
            if name not in fields:
                allowed = ", ".join(sorted(fields))
                self.error(_join(key, name), f"unknown key (allowed here: {allowed})")
        for name, f in fields.items():
            sub = _join(key, name)
            if name in raw:
                kwargs[name] = self.value(hints[name], raw[name], sub)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.error(sub, f"required key is missing (expected {_describe(hints[name])})")
        if len(self.errors) > before:  # later sections are still checked in full
            return None  # type: ignore[return-value]
        try:
            obj = cls(**kwargs)
        except (TypeError, ValueError) as exc:
            self.error(key, str(exc))
            return None  # type: ignore[return-value]
        check = getattr(obj, "validate", None)
        if check is not None:
            for problem in check():
                self.error(_join(key, problem[0]), problem[1])
        return obj


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def host_problem(host: str) -> str | None:
    """Why ``host`` is neither an IP address nor a host name, or None when it is one."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if name and len(name) <= 253 and all(_LABEL.fullmatch(p) for p in name.split(".")):
        return None
    return f"expected an IP address or a host name, got {_show(host)}"


def ws_url_problem(url: str) -> str | None:
    """Why ``url`` is not a usable ``ws://`` or ``wss://`` URL, or None."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"not a valid URL ({exc}): {url!r}"
    if parts.scheme not in ("ws", "wss"):
        return f"must start with ws:// or wss://, got {url!r}"
    if not parts.hostname:
        return f"names no host: {url!r}"
    if port == 0:
        return f"port must be 1 to 65535: {url!r}"
    why = host_problem(parts.hostname)
    return f"host: {why}" if why else None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _show(raw: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "table"}.get(type(raw), type(raw).__name__)
    text = repr(raw)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kind} {text}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value); the value is read as TOML when it
    parses as a TOML value (numbers, booleans, quoted strings, arrays), else as a string."""
    if "=" not in item:
        raise ConfigError([f"--set {item}: expected dotted.key=value"])
    key, _, text = item.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError([f"--set {item}: empty key"])
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return path, value


def add_override_option(parser: Any, example: str) -> None:
    """The ``--set KEY=VALUE`` option of a command that reads a config file (repeatable,
    into ``args.overrides``, for ``apply_overrides``)."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        dest="overrides",
                        help="override a config value, the value in TOML syntax "
                             f"(repeatable), e.g. --set {example}")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` items to ``data``.  A list item is addressed by its index and must
    exist (``sources.0.sites``); a missing table on the way is created.  A path that cannot
    be followed is one ConfigError line naming it."""
    for item in overrides:
        path, value = parse_override(item)
        node: Any = data
        for depth, part in enumerate(path):
            here = ".".join(path[: depth + 1])
            last = depth == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit():
                    raise ConfigError([f"--set {item}: {'.'.join(path[:depth])} is a list: "
                                       f"{part!r} is not an index"])
                if int(part) >= len(node):
                    raise ConfigError([f"--set {item}: {here}: no such item "
                                       f"({'.'.join(path[:depth])} has {len(node)})"])
                index: Any = int(part)
            elif isinstance(node, dict):
                index = part
                if not last:
                    node.setdefault(part, {})
            else:
                raise ConfigError([f"--set {item}: {'.'.join(path[:depth])} is "
                                   f"{_show(node)}, not a table"])
            if last:
                node[index] = value
            else:
                node = node[index]
    return data


#: a config file is a few kB of text: past this it is not one (a log, a device, a FIFO fed
#: for ever) and is refused rather than read to the end
MAX_CONFIG_BYTES = 4 << 20


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config "
                           "file"])
    try:
        return tomllib.loads(toml_text(raw, str(path)))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None


def toml_text(raw: bytes, name: str) -> str:
    """A TOML file's bytes as text: UTF-8, as TOML is.  Windows editors save otherwise --
    UTF-8 with a byte order mark (taken: the same text), UTF-16 (Notepad's "Unicode"), or
    a code page such as 1252 when a comment holds a degree sign -- and each of those is a
    ConfigError saying so and where, not a traceback or "Invalid statement"."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    elif raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError([f"{name}: saved as UTF-16 (Notepad's \"Unicode\"); TOML files are "
                           "UTF-8: save it as UTF-8"])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([f"{name}: not UTF-8 (byte 0x{raw[exc.start]:02x} at line {line}, "
                           f"column {column}); TOML files are UTF-8: save it as UTF-8, not "
                           "in a code page such as ANSI or Latin-1"]) from None


def build(cls: type[T], data: dict[str, Any], origin: str = "<config>", prefix: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``; raise ConfigError listing every problem.
    ``prefix`` is the dotted key of ``data`` within its file, for the messages."""
    builder = _Builder(origin)
    obj = builder.section(cls, data, prefix)
    if builder.errors:
        raise ConfigError(builder.errors)
    return obj


def load(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Read ``path`` (or start from defaults when None), apply ``--set`` overrides, build."""
    data = read_toml(path) if path is not None else {}
    apply_overrides(data, overrides or [])
    return build(cls, data, str(path) if path is not None else "<defaults>")


@dataclasses.dataclass(frozen=True)
class Key:
    """One leaf key of a config schema (see ``iter_keys``)."""

    path: str  # dotted; ``[]`` marks a list of tables, ``<name>`` a table of tables
    type: Any  # the declared type, annotations (a Range) included
    default: Any  # dataclasses.MISSING when the key is required

    def _required_type(self) -> Any:
        tp = self.type
        if get_origin(tp) in (typing.Union, types.UnionType):
            others = [a for a in get_args(tp) if a is not type(None)]
            tp = others[0] if len(others) == 1 else tp
        return tp

    @property
    def base(self) -> Any:
        """The type without Optional and annotations: int, float, str, list[int], ..."""
        return _unannotate(self._required_type())[0]

    @property
    def range(self) -> Range | None:
        """The declared Range of a number (None for other types and undeclared ones)."""
        return _unannotate(self._required_type())[1]


def iter_keys(cls: type, prefix: str = "") -> Iterator[Key]:
    """Every leaf key of the config dataclass ``cls``, walking into sections, optional
    sections (``[spool]``), lists of tables (``alerts.rules[].name``) and tables of
    tables (``gateways.<name>.token``)."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = _join(prefix, f.name)
        default: Any = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        inner = Key(path, tp, default).base
        if dataclasses.is_dataclass(inner):
            yield from iter_keys(inner, path)  # type: ignore[arg-type]
        elif get_origin(inner) is list and dataclasses.is_dataclass(get_args(inner)[0]):
            yield from iter_keys(get_args(inner)[0], f"{path}[]")
        elif get_origin(inner) is dict and dataclasses.is_dataclass(get_args(inner)[1]):
            yield from iter_keys(get_args(inner)[1], f"{path}.<name>")
        else:
            yield Key(path, tp, default)


__all__ = [
    "INT64", "ConfigError", "Key", "Range", "add_override_option", "apply_overrides", "build",
    "host_problem",
    "iter_keys", "load", "parse_override", "read_toml", "toml_text", "ws_url_problem"
]
