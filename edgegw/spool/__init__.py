"""The crash-safe disk spool (see ``spool.py`` for its design note, ``docs/spool.md``).

Public face: the names in ``__all__``; ``format`` (the on-disk record format, for tools
and tests) is public too.  The other modules are internal.
"""

from . import format
from .commit import ACK_PERSIST_S, DropEvent
from .config import SpoolConfig
from .recovery import recover
from .segments import disk_full, list_segments
from .spool import DiskSpool, SpoolFailed

__all__ = ["ACK_PERSIST_S", "DiskSpool", "DropEvent", "SpoolConfig", "SpoolFailed",
           "disk_full", "format", "list_segments", "recover"]
