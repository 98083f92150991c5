"""MQTT sensor feeds.

- ``client``: ``TrioMqttClient``, a Trio driver for paho-mqtt's external-loop API (no paho
  thread), with reconnects, resubscription and backpressure; also used to publish.
- ``topics``: channel-name templates (topic filters: ``edgegw.topicfilter``).
- ``payloads``: payload decoders and the ``edgegw.payloads`` plugin seam.
- ``sizeguard``: ``PublishSizeGuard``, which cuts PUBLISH payloads over the limit out of
  the byte stream before paho reads them (sans-IO).
- ``acks``: ``AckLedger``, which QoS 1 messages may be acknowledged (once durable, in
  order) and which redelivered ones to drop (sans-IO).
- ``source``: ``MqttSource``, the gateway source (entry point ``mqtt``).

Public face: the names in ``__all__`` (``source`` too, as a module); the modules
themselves are internal.
"""

from . import source
from .acks import AckLedger, CheckpointError, Group, keys_from_checkpoint
from .client import ConnectError, ConnectOptions, ConnectRefused, TrioMqttClient, ssl_context
from .payloads import (
    MAX_TIMESTAMP,
    PayloadError,
    UnknownPayloadDecoder,
    decode_number,
    json_decoder,
    make_decoder,
)
from .sizeguard import OVERSIZE_MARK, PublishSizeGuard, oversize_length
from .source import MqttSource, MqttSourceConfig, MqttSourceError
from .topics import TemplateError, compile_template

__all__ = [
    "MAX_TIMESTAMP", "OVERSIZE_MARK", "AckLedger", "CheckpointError", "ConnectError",
    "ConnectOptions", "ConnectRefused", "Group", "MqttSource", "MqttSourceConfig",
    "MqttSourceError", "PayloadError", "PublishSizeGuard", "TemplateError",
    "TrioMqttClient", "UnknownPayloadDecoder", "compile_template", "decode_number",
    "json_decoder", "keys_from_checkpoint", "make_decoder", "oversize_length", "source",
    "ssl_context",
]
