"""edgegw: a Trio edge gateway and hub for semiconductor ATE result streams."""

from .batcher import Batch, Batcher
from .config import ConfigError
from .embed import EmbeddedGateway, open_gateway
from .records import RECORD_TYPES, Record

__version__ = "0.1.0"

__all__ = [
    "RECORD_TYPES", "Batch", "Batcher", "ConfigError", "EmbeddedGateway", "Record",
    "__version__", "open_gateway",
]
