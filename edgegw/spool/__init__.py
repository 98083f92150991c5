"""The crash-safe disk spool (see ``spool.py`` for its design note, ``docs/spool.md``)."""

from .config import SpoolConfig
from .spool import DiskSpool, DropEvent, recover

__all__ = ["DiskSpool", "DropEvent", "SpoolConfig", "recover"]
