"""The web layer: plain HTTP and WebSocket on one Trio port (h11 + wsproto), shared by the
gateway (its status port) and the hub.  Knows nothing of either: handlers are plugged in."""

from .deflate import Deflater, accept_offer
from .http import Request, Response, json_response, path_segments
from .server import Handler, HttpLimits, HttpServer, WsAdmit, WsHandler
from .status import install_status
from .websocket import ConnectionClosed, MessageTooBig, SendGate, WebSocket, prepare_message

__all__ = [
    "ConnectionClosed", "Deflater", "Handler", "HttpLimits", "HttpServer", "MessageTooBig",
    "Request", "Response", "SendGate", "WebSocket", "WsAdmit", "WsHandler", "accept_offer",
    "install_status", "json_response", "path_segments", "prepare_message",
]
