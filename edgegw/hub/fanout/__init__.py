"""The live fan-out: ``/ws/live`` subscribers follow the live state (docs/live-protocol.md).

- ``core``: ``LiveHub``, the sans-IO protocol core (subscriptions, ticks, slow clients).
- ``channels``, ``deltas``, ``encoding``, ``config``: what it is built from.
- ``service``: ``LiveFanout``, the Trio layer (sockets, the ticker, a sender per client).
"""

from .channels import Client
from .config import (
    CLOSE_TOO_SLOW,
    SUBPROTOCOL_CBOR,
    SUBPROTOCOL_JSON,
    SUBPROTOCOLS,
    LiveConfig,
    pattern_error,
)
from .core import AckHandler, LiveHub, RequestError, StateSource
from .deltas import CONCAT_KEYS, EVENT_KEYS, coalesce, compose_deltas
from .encoding import CBOR, JSON, Encoding, encoding_for_subprotocol
from .service import LIVE_PATH, STATS_PATH, LiveFanout

__all__ = [
    "CBOR", "CLOSE_TOO_SLOW", "CONCAT_KEYS", "EVENT_KEYS", "JSON", "LIVE_PATH", "STATS_PATH",
    "SUBPROTOCOLS", "SUBPROTOCOL_CBOR", "SUBPROTOCOL_JSON", "AckHandler", "Client",
    "Encoding", "LiveConfig", "LiveFanout", "LiveHub", "RequestError", "StateSource",
    "coalesce", "compose_deltas", "encoding_for_subprotocol", "pattern_error",
]
