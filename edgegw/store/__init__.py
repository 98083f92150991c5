"""The frame store: where sequence-numbered frames wait for the hub's acknowledgement.

The seam between the gateway's batcher and its uplink, below both the gateway and the
disk spool (``edgegw.spool`` implements ``FrameStore`` too).  See ``base.py`` for the
contract.
"""

from .base import FrameStore, StoredFrame
from .memory import MemoryFrameStore

__all__ = ["FrameStore", "MemoryFrameStore", "StoredFrame"]
