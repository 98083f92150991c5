"""The hub's configuration (``edgegw hub --config hub.toml``)."""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Literal

from ..auth.config import AuthConfig, TlsConfig
from ..config import Range, host_problem
from ..web import HttpLimits
from .alerts import AlertsConfig
from .fanout.config import LiveConfig


@dataclasses.dataclass(frozen=True)
class HubSection:
    listen: str = "127.0.0.1"
    port: Annotated[int, Range(1, 65535, also=0)] = 8765  # 0: any free port
    data_dir: str = "./edgegw-hub-data"
    heartbeat_s: Annotated[float, Range(1, 3600)] = 5.0
    hello_timeout_s: Annotated[float, Range(1, 600)] = 10.0
    max_frame_bytes: Annotated[int, Range(1024, 64 << 20)] = 8 << 20
    max_records_per_frame: Annotated[int, Range(1, 1_000_000)] = 50_000
    # how many holes the applied sequence set may have: >0 lets a gateway send live
    # frames ahead of its backlog after an outage (see docs/protocol.md)
    max_holes: Annotated[int, Range(0, 1000)] = 8
    # frames in flight per gateway between receipt and durable commit
    apply_queue_frames: Annotated[int, Range(1, 65536)] = 64
    # frame-body encodings accepted from a gateway that offers one (docs/protocol.md section 5.1)
    compression: Literal["off", "zlib"] = "off"
    # load shedding: with this many gateway handshakes under way, a readiness probe or an
    # upgrade on /ws/gateway is answered 503 with Retry-After: busy_retry_after_s
    max_pending_handshakes: Annotated[int, Range(1, 1_000_000)] = 1000
    busy_retry_after_s: Annotated[float, Range(0.1, 3600)] = 5.0
    # failed gateway handshakes allowed per remote address: a burst, then this many per
    # minute (further upgrades from it are answered 429 before any handshake)
    gateway_failures_burst: Annotated[int, Range(1, 1_000_000)] = 10
    gateway_failures_per_minute: Annotated[float, Range(0.01, 1_000_000)] = 6.0
    keep_frame_bodies: bool = True
    # applied frames older than this are deleted (they only serve the live-state rebuild
    # at start-up); the applied sequence sets that de-duplicate are kept.  0: keep forever
    retain_frames_hours: Annotated[float, Range(0, 876_000)] = 168.0
    prune_interval_s: Annotated[float, Range(0.01, 86_400)] = 600.0
    # Survivors of young garbage collections are frozen this often (seconds; 0: off), so the
    # collector's full collections never walk the live state (see edgegw/hub/gcpacing.py);
    # a full sweep for cyclic garbage runs every gc_full_sweep_s (0: never).
    gc_freeze_s: Annotated[float, Range(0.1, 3600, also=0)] = 1.0
    gc_full_sweep_s: Annotated[float, Range(1, 604_800, also=0)] = 600.0

    def validate(self) -> list[tuple[str, str]]:
        # numeric ranges are declared on the fields (Range) and checked by the loader
        problems = []
        why = host_problem(self.listen)
        if why:
            problems.append(("listen", why))
        if not self.data_dir:
            problems.append(("data_dir", "must not be empty"))
        return problems


@dataclasses.dataclass(frozen=True)
class GatewayAuth:
    """A gateway's token, in clear or as its SHA-256 (hex): one of the two."""

    token: str = dataclasses.field(default="", repr=False)  # never in a log line
    token_sha256: str = ""

    def validate(self) -> list[tuple[str, str]]:
        if bool(self.token) == bool(self.token_sha256):
            return [("token", "give exactly one of token and token_sha256")]
        if self.token_sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", self.token_sha256):
            return [("token_sha256", "must be 64 hex digits (sha256sum of the token)")]
        return []


@dataclasses.dataclass(frozen=True)
class HubConfig:
    hub: HubSection = dataclasses.field(default_factory=HubSection)
    # gateway id -> its token; a gateway not listed here is refused
    gateways: dict[str, GatewayAuth] = dataclasses.field(default_factory=dict)
    live: LiveConfig = dataclasses.field(default_factory=LiveConfig)
    # timeouts and connection caps of the one HTTP port (edgegw/web/server.py)
    http: HttpLimits = dataclasses.field(default_factory=HttpLimits)
    alerts: AlertsConfig = dataclasses.field(default_factory=AlertsConfig)
    # sign-in for the dashboard, the API and /ws/live; none: open, loopback only
    auth: AuthConfig | None = None
    tls: TlsConfig = dataclasses.field(default_factory=TlsConfig)
