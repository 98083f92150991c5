"""Shared fixtures.  Each helper's fixtures live in their own module and are imported
here in a delimited section, so that sections merge without conflicts."""

# ---- mqtt: brokers (tests/mqtt_broker.py) ---------------------------------------------
from mqtt_broker import mqtt_broker, start_broker  # noqa: F401

# ---- end mqtt ---------------------------------------------------------------------------
