"""The gateway: sources -> batcher -> frame store -> uplink.

Public face (for embedders, plugins and tests): the names below.  The modules inside
(``service``, ``uplink``, ``probe``, ``scheduler``, ``rollback``, ``positions``, ``sighup``,
``requeue``, ``config``) are internal: import from ``edgegw.gateway``.
"""

from ..store import FrameStore, MemoryFrameStore, StoredFrame
from .config import GatewayConfig, build_gateway_config, load_gateway_config
from .deadletters import (
    BODY_ERRORS,
    DEAD_LETTER_FILE,
    DeadLetterScan,
    entry_records,
    open_dead_letter_file,
    read_dead_letter_keys,
    scan_dead_letter_file,
    scan_dead_letters,
)
from .positions import PositionLog, Teller, positions_of, taken_back
from .probe import ProbeResult, ProbeTarget, probe_once, retry_after_seconds
from .requeue import REQUEUE_KEY, RequeueReport, requeue
from .rollback import REISSUE_KEY, Rollback, reissue, resume, rolled_back
from .scheduler import SendScheduler, Want
from .service import (
    AFTER_KEY,
    GC_YOUNG_THRESHOLD,
    ORIGINS_KEY,
    RID_KEY,
    Gateway,
    GatewaySink,
    tune_gc,
)
from .sighup import GatewayReloader
from .uplink import Uplink

__all__ = [
    "AFTER_KEY", "BODY_ERRORS", "DEAD_LETTER_FILE", "GC_YOUNG_THRESHOLD", "ORIGINS_KEY",
    "REISSUE_KEY", "REQUEUE_KEY", "RID_KEY",
    "DeadLetterScan", "FrameStore", "Gateway", "GatewayConfig", "GatewayReloader",
    "GatewaySink", "MemoryFrameStore", "PositionLog", "ProbeResult", "ProbeTarget",
    "RequeueReport", "Rollback", "SendScheduler", "StoredFrame", "Teller", "Uplink", "Want",
    "build_gateway_config", "entry_records", "load_gateway_config", "open_dead_letter_file",
    "positions_of", "probe_once", "read_dead_letter_keys", "reissue", "requeue", "resume",
    "retry_after_seconds", "rolled_back", "scan_dead_letter_file", "scan_dead_letters",
    "taken_back", "tune_gc",
]
