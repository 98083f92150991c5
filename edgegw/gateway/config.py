"""The gateway's configuration (``edgegw gateway --config gateway.toml``)."""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Any, Literal

from ..config import ConfigError, Range, build, host_problem, ws_url_problem
from ..sources import UnknownSourceType, source_type
from ..spool.config import SpoolConfig

# a DNS name as a Host header carries it (letters, digits, '-', '_', dots), no port
HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")


@dataclasses.dataclass(frozen=True)
class GatewaySection:
    id: str
    token: str = dataclasses.field(repr=False)  # never in a log line
    hub_url: str = "ws://127.0.0.1:8765/ws/gateway"
    state_dir: str = "./edgegw-gateway-data"
    # 0 disables the local status port (/healthz, /api/stats, /metrics)
    status_port: Annotated[int, Range(1, 65535, also=0)] = 0
    status_listen: str = "127.0.0.1"
    # Host names the status port answers to besides IP addresses and dotless names
    # (localhost): it has no sign-in, so any other name may be a DNS-rebinding page's
    # (docs/security.md).  A monitoring system scraping it by a dotted name lists it here.
    status_allowed_hosts: list[str] = dataclasses.field(default_factory=list)
    # the dead-letter file's bound: past it no more frames are sent (they wait in the spool,
    # under its cap) until the file is smaller -- a hub that rejects every frame would
    # otherwise fill the tester's disk with it (docs/spool.md, "The dead-letter file");
    # 0: no bound
    dead_letter_max_bytes: Annotated[int, Range(1 << 20, also=0)] = 1 << 30

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if not self.id or len(self.id) > 128:
            problems.append(("id", "must be 1 to 128 characters"))
        if not self.token:
            problems.append(("token", "must not be empty (the hub refuses an empty token)"))
        why = ws_url_problem(self.hub_url)
        if why:
            problems.append(("hub_url", why))
        if not self.state_dir:
            problems.append(("state_dir", "must not be empty"))
        why = host_problem(self.status_listen)
        if why:
            problems.append(("status_listen", why))
        for name in self.status_allowed_hosts:
            if not HOST_NAME.fullmatch(name):
                problems.append(("status_allowed_hosts",
                                 f"not a host name (no scheme, port or path): {name!r}"))
        return problems


@dataclasses.dataclass(frozen=True)
class BatchSection:
    # 8000: under a flood each frame's fixed costs (an fsync and a commit on each side, the
    # WebSocket message, the ACK, the task switches) are paid per 8000 records, not 2000:
    # 26-30 % less CPU per record on gateway and hub together (docs/performance.md).  Below
    # 80k records/s a frame is cut by max_delay_ms first, so the latency is what it was.
    max_records: Annotated[int, Range(1, 100_000)] = 8000
    max_delay_ms: Annotated[float, Range(0, 3_600_000)] = 100.0


@dataclasses.dataclass(frozen=True)
class UplinkSection:
    heartbeat_s: Annotated[float, Range(1, 3600)] = 5.0
    connect_timeout_s: Annotated[float, Range(1, 600)] = 10.0
    backoff_initial_s: Annotated[float, Range(0, 3600, lo_open=True)] = 0.5
    backoff_max_s: Annotated[float, Range(0, 3600, lo_open=True)] = 30.0
    # while the hub cannot be reached at all, probe it every uniform(0, this) seconds
    probe_interval_s: Annotated[float, Range(0.1, 3600)] = 1.0
    probe_timeout_s: Annotated[float, Range(1, 600)] = 2.0
    max_frame_bytes: Annotated[int, Range(1024, 64 << 20)] = 8 << 20
    # frames sent but not yet acknowledged
    window_frames: Annotated[int, Range(2, 65536)] = 64  # one slot is kept for live frames
    # Frame-body compression for thin links (docs/protocol.md section 5.1): offered in
    # HELLO, used only when the hub accepts it; bodies below compression_min_bytes go plain.
    # Level 1 gets most of the gain for the least gateway CPU (bench/compression.py).
    compression: Literal["off", "zlib"] = "off"
    compression_level: Annotated[int, Range(1, 9)] = 1
    compression_min_bytes: Annotated[int, Range(0, 64 << 20)] = 1024
    # The newest wire protocol version to offer (docs/protocol.md section 9).  At 2 or 3
    # frames are stored with columnar bodies (section 5.2; at 3 their float columns as
    # typed arrays while the hub last agreed v3), sent as they are to a hub of that version
    # and converted for an older one; at 1 they are stored and sent as v1 rows.
    max_protocol_version: Annotated[int, Range(1, 3)] = 3
    # Source positions (docs/protocol.md section 4.1): told to a hub that keeps them each
    # time the uplink has sent all there is, and every this many seconds while it never has
    # (a flood), so that this gateway, should its state_dir be lost, takes them back instead
    # of sending its files again; 0: neither told nor asked for.  A gateway whose store
    # starts afresh waits up to resume_wait_s for the hub's answer before its replaying
    # sources (the STDF tail) start.
    positions_every_s: Annotated[float, Range(0, 3600)] = 0.25
    resume_wait_s: Annotated[float, Range(0, 86400)] = 60.0
    # wss:// only: the CA that signed the hub's certificate (default: the system's), the
    # certificate's SHA-256 fingerprint to insist on (optional, on top of the CA check), and
    # a client certificate for hubs that ask for one (its CN or a DNS name: the gateway id)
    ca_file: str = ""
    pin_sha256: str = ""
    cert_file: str = ""
    key_file: str = ""

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        pin = self.pin_sha256.replace(":", "").replace(" ", "")
        if pin and not re.fullmatch(r"[0-9a-fA-F]{64}", pin):
            problems.append(("pin_sha256", "must be a SHA-256 fingerprint: 64 hex digits "
                             "(colons allowed)"))
        if bool(self.cert_file) != bool(self.key_file):
            problems.append(("key_file", "cert_file and key_file go together"))
        if self.backoff_max_s < self.backoff_initial_s:
            problems.append(("backoff_max_s", "must be >= backoff_initial_s"))
        return problems


@dataclasses.dataclass(frozen=True)
class QueueSection:
    """The in-memory frame queue used when no disk spool is configured."""

    max_frames: Annotated[int, Range(1, 10_000_000)] = 1000
    policy: Literal["block", "drop_oldest"] = "block"
    #: health turns unhealthy when frames wait and nothing was acknowledged this long
    #: (``spool.stall_timeout_s`` with the disk spool)
    stall_timeout_s: Annotated[float, Range(0.1, 86_400)] = 60.0


#: bytes a record may take in a spooled frame, for the spool.max_bytes check (records
#: encode to 60-130 bytes: a PTR with its test text, a part result, a sensor window)
SPOOL_BYTES_PER_RECORD = 256


#: source names starting with it are refused: the gateway keeps its own state among the
#: sources' checkpoints under such keys (``__rid__``, ``__after__``, ``__origins__``,
#: ``__split__``)
RESERVED_NAME_PREFIX = "__"


@dataclasses.dataclass(frozen=True)
class SourceEntry:
    name: str
    type: str
    config: Any


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    gateway: GatewaySection
    batch: BatchSection = dataclasses.field(default_factory=BatchSection)
    uplink: UplinkSection = dataclasses.field(default_factory=UplinkSection)
    queue: QueueSection = dataclasses.field(default_factory=QueueSection)
    # the crash-safe disk spool (edgegw/spool); without it frames wait in memory (queue)
    spool: SpoolConfig | None = None
    sources: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def validate(self) -> list[tuple[str, str]]:
        problems = [(f"sources[{i}].{k}", m) for i, (k, m) in self._source_problems()]
        if self.spool is not None:
            # a frame may fill a quarter of the cap at most (a larger batch is split), so
            # the cap must hold four full batches at a generous record size
            need = 4 * self.batch.max_records * SPOOL_BYTES_PER_RECORD
            if self.spool.max_bytes < need:
                problems.append(("spool.max_bytes", (
                    f"must hold 4 frames of batch.max_records records: >= 4 x "
                    f"{self.batch.max_records} x {SPOOL_BYTES_PER_RECORD} = {need}")))
        return problems

    def _source_problems(self) -> list[tuple[int, tuple[str, str]]]:
        out: list[tuple[int, tuple[str, str]]] = []
        names: set[str] = set()
        for i, raw in enumerate(self.sources):
            for key in ("name", "type"):
                if not isinstance(raw.get(key), str) or not raw.get(key):
                    out.append((i, (key, "required key is missing (expected a string)")))
            name = raw.get("name")
            if isinstance(name, str) and name in names:
                out.append((i, ("name", f"duplicate source name {name!r}")))
            if isinstance(name, str) and name.startswith(RESERVED_NAME_PREFIX):
                # a source's checkpoint is kept under its name, beside the gateway's own
                # keys (__rid__, __after__, __split__): a source of that name would corrupt them
                out.append((i, ("name", f"{name!r}: a source name must not start with "
                                        f"{RESERVED_NAME_PREFIX!r} (reserved for the "
                                        "gateway's own checkpoint keys)")))
            names.add(name)  # type: ignore[arg-type]
            if isinstance(raw.get("type"), str):
                try:
                    source_type(raw["type"])
                except UnknownSourceType as exc:
                    out.append((i, ("type", str(exc))))
        return out

    def source_entries(self, origin: str = "<config>") -> list[SourceEntry]:
        """Each ``[[sources]]`` table built into its type's own Config dataclass."""
        entries = []
        errors: list[str] = []
        for i, raw in enumerate(self.sources):
            cls = source_type(raw["type"])
            rest = {k: v for k, v in raw.items() if k not in ("name", "type")}
            try:
                cfg: Any = build(cls.Config, rest, origin, prefix=f"sources[{i}]")
            except ConfigError as exc:
                errors.extend(exc.errors)
                continue
            entries.append(SourceEntry(raw["name"], raw["type"], cfg))
        if errors:
            raise ConfigError(errors)
        return entries


def build_gateway_config(data: dict[str, Any], origin: str = "<config>") -> GatewayConfig:
    """Build a gateway config and check every ``[[sources]]`` table with its type's own
    Config; one ConfigError lists every problem (a bad section does not hide a bad source
    table, nor the other way round)."""
    errors: list[str] = []
    try:
        cfg = build(GatewayConfig, data, origin)
    except ConfigError as exc:
        errors.extend(exc.errors)
        raw = data.get("sources", [])
        if not (isinstance(raw, list) and all(isinstance(r, dict) for r in raw)):
            raise
        cfg = GatewayConfig(gateway=None, sources=raw)  # type: ignore[arg-type]  # a probe
        structure = [f"{origin}: {k}: {m}" for k, m in cfg.validate()]
        if structure:
            raise ConfigError(list(dict.fromkeys(errors + structure))) from None
    try:
        cfg.source_entries(origin)
    except ConfigError as exc:
        errors.extend(exc.errors)
    if errors:
        raise ConfigError(errors)
    return cfg


def load_gateway_config(path: str | None, overrides: list[str] | None = None) -> GatewayConfig:
    from ..config import apply_overrides, read_toml

    data = read_toml(path) if path is not None else {}
    apply_overrides(data, overrides or [])
    return build_gateway_config(data, str(path) if path is not None else "<defaults>")
