"""The hub's configuration (``edgegw hub --config hub.toml``)."""

from __future__ import annotations

import dataclasses

from .alerts import AlertsConfig
from .http import HttpLimits
from .live_protocol import LiveConfig


@dataclasses.dataclass(frozen=True)
class HubSection:
    listen: str = "127.0.0.1"
    port: int = 8765
    data_dir: str = "./edgegw-hub-data"
    heartbeat_s: float = 5.0
    hello_timeout_s: float = 10.0
    max_frame_bytes: int = 8 << 20
    max_records_per_frame: int = 50_000
    # how many holes the applied sequence set may have: >0 lets a gateway send live
    # frames ahead of its backlog after an outage (see docs/protocol.md)
    max_holes: int = 8
    # frames in flight per gateway between receipt and durable commit
    apply_queue_frames: int = 64
    # load shedding: with this many gateway handshakes under way, a readiness probe or an
    # upgrade on /ws/gateway is answered 503 with Retry-After: busy_retry_after_s
    max_pending_handshakes: int = 1000
    busy_retry_after_s: float = 5.0
    keep_frame_bodies: bool = True
    # applied frames older than this are deleted (they only serve the live-state rebuild
    # at start-up); the applied sequence sets that de-duplicate are kept.  0: keep forever
    retain_frames_hours: float = 168.0
    prune_interval_s: float = 600.0
    # Survivors of young garbage collections are frozen this often (seconds; 0: off), so the
    # collector's full collections never walk the live state (see edgegw/hub/gcpacing.py);
    # a full sweep for cyclic garbage runs every gc_full_sweep_s (0: never).
    gc_freeze_s: float = 1.0
    gc_full_sweep_s: float = 600.0

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(("port", "must be between 0 and 65535"))
        if self.heartbeat_s <= 0:
            problems.append(("heartbeat_s", "must be > 0"))
        if self.max_frame_bytes < 1024:
            problems.append(("max_frame_bytes", "must be at least 1024"))
        if self.max_holes < 0:
            problems.append(("max_holes", "must be >= 0"))
        if self.max_pending_handshakes < 1:
            problems.append(("max_pending_handshakes", "must be >= 1"))
        if self.busy_retry_after_s <= 0:
            problems.append(("busy_retry_after_s", "must be > 0"))
        if self.retain_frames_hours < 0:
            problems.append(("retain_frames_hours", "must be >= 0 (0 keeps frames forever)"))
        if self.prune_interval_s <= 0:
            problems.append(("prune_interval_s", "must be > 0"))
        if self.gc_freeze_s < 0:
            problems.append(("gc_freeze_s", "must be >= 0 (0: off)"))
        if self.gc_full_sweep_s < 0:
            problems.append(("gc_full_sweep_s", "must be >= 0 (0: never)"))
        return problems


@dataclasses.dataclass(frozen=True)
class GatewayAuth:
    token: str

    def validate(self) -> list[tuple[str, str]]:
        return [("token", "must not be empty")] if not self.token else []


@dataclasses.dataclass(frozen=True)
class HubConfig:
    hub: HubSection = dataclasses.field(default_factory=HubSection)
    # gateway id -> its token; a gateway not listed here is refused
    gateways: dict[str, GatewayAuth] = dataclasses.field(default_factory=dict)
    live: LiveConfig = dataclasses.field(default_factory=LiveConfig)
    # timeouts and connection caps of the one HTTP port (edgegw/hub/http.py)
    http: HttpLimits = dataclasses.field(default_factory=HttpLimits)
    alerts: AlertsConfig = dataclasses.field(default_factory=AlertsConfig)
