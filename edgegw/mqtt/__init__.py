"""MQTT sensor feeds: a Trio driver for paho-mqtt (``client``), topic filters and channel
templates (``topics``), payload decoders (``payloads``) and the gateway source (``source``)."""
