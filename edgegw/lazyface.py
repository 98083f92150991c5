"""A package's public face, loaded on first use (PEP 562).

A package lists the names it exports and the module each comes from; ``lazy_face`` gives
it the module-level ``__getattr__`` and ``__dir__`` that import a name's module only when
the name is first used, so importing one module never imports a whole package (start-up,
as for ``edgegw stdf stats``; every module imports on its own: tests/test_layers.py).
``edgegw`` itself keeps its own copy: ``import edgegw`` imports no module of it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_face(package: str, namespace: dict[str, Any], exports: Mapping[str, str],
              submodules: Iterable[str] = ()
              ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` (whose globals are ``namespace``):
    ``exports`` maps a name to its module, absolute or (without a dot) a module of the
    package; ``submodules`` are the package's modules its face names.  A name once
    loaded is kept in ``namespace``, so it costs nothing the next time."""
    subs = frozenset(submodules)

    def __getattr__(name: str) -> Any:
        if name in subs:
            return importlib.import_module(f"{package}.{name}")
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(
            module if "." in module else f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports) | subs)

    return __getattr__, __dir__
