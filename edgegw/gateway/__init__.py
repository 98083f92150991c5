"""The gateway: sources -> batcher -> frame store -> uplink."""

from ..store import FrameStore, MemoryFrameStore, StoredFrame
from .config import GatewayConfig, load_gateway_config
from .service import Gateway, GatewaySink

__all__ = [
    "FrameStore", "Gateway", "GatewayConfig", "GatewaySink", "MemoryFrameStore", "StoredFrame",
    "load_gateway_config",
]
