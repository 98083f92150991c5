"""The gateway's configuration (``edgegw gateway --config gateway.toml``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from ..config import ConfigError, build
from ..sources import UnknownSourceType, source_type
from ..spool.config import SpoolConfig


@dataclasses.dataclass(frozen=True)
class GatewaySection:
    id: str
    token: str
    hub_url: str = "ws://127.0.0.1:8765/ws/gateway"
    state_dir: str = "./edgegw-gateway-data"
    # 0 disables the local status port (/healthz, /api/stats, /metrics)
    status_port: int = 0
    status_listen: str = "127.0.0.1"

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if not self.id or len(self.id) > 128:
            problems.append(("id", "must be 1 to 128 characters"))
        if not self.hub_url.startswith(("ws://", "wss://")):
            problems.append(("hub_url", f"must start with ws:// or wss://, got {self.hub_url!r}"))
        return problems


@dataclasses.dataclass(frozen=True)
class BatchSection:
    max_records: int = 2000
    max_delay_ms: float = 100.0

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.max_records < 1:
            problems.append(("max_records", "must be >= 1"))
        if self.max_delay_ms < 0:
            problems.append(("max_delay_ms", "must be >= 0"))
        return problems


@dataclasses.dataclass(frozen=True)
class UplinkSection:
    heartbeat_s: float = 5.0
    connect_timeout_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    # while the hub cannot be reached at all, probe it every uniform(0, this) seconds
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 2.0
    max_frame_bytes: int = 8 << 20
    # frames sent but not yet acknowledged
    window_frames: int = 64
    ca_file: str = ""

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.backoff_initial_s <= 0 or self.backoff_max_s < self.backoff_initial_s:
            problems.append(("backoff_max_s", "need 0 < backoff_initial_s <= backoff_max_s"))
        if self.window_frames < 1:
            problems.append(("window_frames", "must be >= 1"))
        if self.probe_interval_s <= 0:
            problems.append(("probe_interval_s", "must be > 0"))
        if self.probe_timeout_s <= 0:
            problems.append(("probe_timeout_s", "must be > 0"))
        return problems


@dataclasses.dataclass(frozen=True)
class QueueSection:
    """The in-memory frame queue used when no disk spool is configured."""

    max_frames: int = 1000
    policy: Literal["block", "drop_oldest"] = "block"


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
        return [(f"sources[{i}].{k}", m) for i, (k, m) in self._source_problems()]

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
                cfg = build(cls.Config, rest, origin, prefix=f"sources[{i}]")
            except ConfigError as exc:
                errors.extend(exc.errors)
                continue
            entries.append(SourceEntry(raw["name"], raw["type"], cfg))
        if errors:
            raise ConfigError(errors)
        return entries


def load_gateway_config(path: str | None, overrides: list[str] | None = None) -> GatewayConfig:
    from ..config import load

    cfg = load(GatewayConfig, path, overrides)
    cfg.source_entries(str(path) if path else "<defaults>")  # validate every source table
    return cfg
