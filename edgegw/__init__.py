"""edgegw: a Trio edge gateway and hub for semiconductor ATE result streams.

The names below are loaded on first use (PEP 562), so ``import edgegw.spool`` (or any
other module) imports that module and what it needs, never the whole gateway: every
module must import on its own (``tests/test_layers.py``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "RECORD_TYPES": "edgegw.records",
    "Batch": "edgegw.batcher",
    "Batcher": "edgegw.batcher",
    "ConfigError": "edgegw.config",
    "EmbeddedGateway": "edgegw.embed",
    "Record": "edgegw.records",
    "open_gateway": "edgegw.embed",
}

__all__ = [*sorted(_EXPORTS), "__version__"]

if TYPE_CHECKING:
    # for type checkers and IDEs (the redundant aliases mark re-exports)
    from .batcher import Batch as Batch
    from .batcher import Batcher as Batcher
    from .config import ConfigError as ConfigError
    from .embed import EmbeddedGateway as EmbeddedGateway
    from .embed import open_gateway as open_gateway
    from .records import RECORD_TYPES as RECORD_TYPES
    from .records import Record as Record


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edgegw' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
