"""MQTT sensor feeds.

- ``client``: ``TrioMqttClient``, a Trio driver for paho-mqtt's external-loop API (no paho
  thread), with reconnects, resubscription and backpressure; also used to publish.
- ``topics``: channel-name templates (topic filters: ``edgegw.topicfilter``).
- ``payloads``: payload decoders and the ``edgegw.payloads`` plugin seam.
- ``acks``: ``AckLedger``, which QoS 1 messages may be acknowledged (once durable, in
  order) and which redelivered ones to drop (sans-IO).
- ``source``: ``MqttSource``, the gateway source (entry point ``mqtt``).
"""

from .client import ConnectError, ConnectOptions, ConnectRefused, TrioMqttClient, ssl_context
from .payloads import PayloadError
from .source import MqttSource, MqttSourceConfig

__all__ = [
    "ConnectError",
    "ConnectOptions",
    "ConnectRefused",
    "MqttSource",
    "MqttSourceConfig",
    "PayloadError",
    "TrioMqttClient",
    "ssl_context",
]
