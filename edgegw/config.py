"""TOML configuration into typed, frozen dataclasses.

Every error names the file, the dotted key and what was expected, so that a broken
config gives one clear line instead of a traceback.  Sections are plain dataclasses;
the loader walks their type hints, so a new section (a source type in a plugin, say)
needs no change here.
"""

from __future__ import annotations

import dataclasses
import tomllib  # Python >= 3.11; the tomli fallback is only declared for older builds
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")


class ConfigError(Exception):
    """One or more configuration errors; ``str()`` is one line per error."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "nothing"
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    if origin is dict:
        return f"a table of {_describe(get_args(tp)[1])}"
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
        origin = get_origin(tp)
        if tp is Any:
            return raw
        if origin in (typing.Union, types.UnionType):
            args = get_args(tp)
            if raw is None and type(None) in args:
                return None
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
        if origin is dict:
            if not isinstance(raw, dict):
                self.error(key, f"expected {_describe(tp)}, got {_show(raw)}")
                return {}
            _, val_tp = get_args(tp)
            return {k: self.value(val_tp, v, f"{key}.{k}") for k, v in raw.items()}
        if dataclasses.is_dataclass(tp):
            return self.section(tp, raw, key)
        if tp is float:
            if isinstance(raw, (int, float)) and not isinstance(raw, bool):
                return float(raw)
        elif tp is int:
            if isinstance(raw, int) and not isinstance(raw, bool):
                return raw
        elif isinstance(tp, type) and isinstance(raw, tp):
            return raw
        self.error(key, f"expected {_describe(tp)}, got {_show(raw)}")
        return None

    def section(self, cls: type[T], raw: Any, key: str) -> T:
        if not isinstance(raw, dict):
            self.error(key, f"expected a table, got {_show(raw)}")
            raw = {}
        before = len(self.errors)
        hints = get_type_hints(cls)
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


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            if part.isdigit() and isinstance(node, list):
                node = node[int(part)]
                continue
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, (dict, list)):
                raise ConfigError([f"--set {item}: {part} is not a table"])
            node = nxt
        node[path[-1]] = value
    return data


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None


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
