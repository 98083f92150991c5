"""The crash-safe disk spool (see ``spool.py`` for its design note, ``docs/spool.md``)."""

from .commit import DropEvent
from .config import SpoolConfig
from .recovery import recover
from .spool import DiskSpool

__all__ = ["DiskSpool", "DropEvent", "SpoolConfig", "recover"]
