"""The live fan-out: ``/ws/live`` subscribers follow the live state (docs/live-protocol.md).

- ``core``: ``LiveHub``, the sans-IO protocol core (subscriptions, ticks, slow clients).
- ``channels``, ``deltas``, ``encoding``, ``config``: what it is built from.
- ``service``: ``LiveFanout``, the Trio layer (sockets, the ticker, a sender per client).
- ``writer``, ``writer_process``: the writer process a tick's writes may go to
  (``live.write_process``): its messages, and the hub's side of it.
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
from .writer import MAX_FDS as WRITER_MAX_FDS
from .writer import decode_batch, decode_result, encode_batch, encode_result
from .writer_process import WRITER_SCRIPT, WriterProcess, chunk_writes

__all__ = [
    "CBOR",
    "CLOSE_TOO_SLOW",
    "CONCAT_KEYS",
    "EVENT_KEYS",
    "JSON",
    "LIVE_PATH",
    "STATS_PATH",
    "SUBPROTOCOLS",
    "SUBPROTOCOL_CBOR",
    "SUBPROTOCOL_JSON",
    "WRITER_MAX_FDS",
    "WRITER_MAX_PAYLOAD",
    "WRITER_SCRIPT",
    "AckHandler",
    "Client",
    "Encoding",
    "LiveConfig",
    "LiveFanout",
    "LiveHub",
    "RequestError",
    "StateSource",
    "WriterProcess",
    "chunk_writes",
    "coalesce",
    "compose_deltas",
    "decode_batch",
    "decode_result",
    "encode_batch",
    "encode_result",
    "encoding_for_subprotocol",
    "pattern_error",
]
