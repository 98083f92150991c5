"""Wire protocol v1 between gateway and hub (sans-IO).  See docs/protocol.md."""

from .compression import ENCODINGS, compress_body, decompress_body
from .connection import Duplicate, GatewayConnection, HubConnection, State
from .intervals import IntervalSet
from .messages import (
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Ack,
    CloseCode,
    Data,
    FrameError,
    Hello,
    Ping,
    Pong,
    ProtocolError,
    Refuse,
    Reject,
    Welcome,
    decode,
    decode_body,
    encode,
    encode_body,
)

__all__ = [
    "ENCODINGS", "PROTOCOL_VERSION", "SUPPORTED_VERSIONS", "Ack", "CloseCode", "Data", "Duplicate",
    "FrameError", "GatewayConnection", "Hello", "HubConnection", "IntervalSet", "Ping",
    "Pong", "ProtocolError", "Refuse", "Reject", "State", "Welcome", "compress_body",
    "decode", "decode_body", "decompress_body", "encode", "encode_body",
]
