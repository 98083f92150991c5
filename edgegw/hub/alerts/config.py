"""The ``[alerts]`` section of hub.toml: rules, webhooks and the engine's settings.

The rule reference (every key, with examples) is ``docs/alerts.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from edgegw.config import Range

Priority = Literal["P0", "P1", "P2", "P3"]
EventLevel = Literal["info", "warning", "error"]
RuleKind = Literal[
    "wafer_yield",
    "lot_yield",
    "consecutive_fails",
    "site_yield_gap",
    "bin_share",
    "test_cpk",
    "sensor_range",
    "gateway_offline",
    "gateway_event",
]
RULE_KINDS: tuple[str, ...] = RuleKind.__args__  # type: ignore[attr-defined]


@dataclasses.dataclass(frozen=True)
class AlertRuleConfig:
    """One ``[[alerts.rules]]`` table.  Which keys matter depends on ``kind``."""

    name: str
    kind: RuleKind
    priority: Priority = "P2"
    #: wafer_yield/lot_yield: alert when yield < threshold (0..1); site_yield_gap: when the
    #: best minus the worst site yield > threshold; test_cpk: when Cpk < threshold;
    #: bin_share: a fixed share limit (0..1) instead of the statistical one.
    threshold: float | None = None
    #: yield, gap and bin-share rules wait for this many dies (per site for the gap rule).
    min_parts: Annotated[int, Range(1)] = 50
    #: consecutive_fails: this many fails in a row on one site.
    count: Annotated[int, Range(1)] = 5
    #: bin_share: hard bins watched (empty: every hard bin not in ``good_bins``).
    bins: list[Annotated[int, Range(0, 65535)]] = dataclasses.field(default_factory=list)
    good_bins: list[Annotated[int, Range(0, 65535)]] = dataclasses.field(
        default_factory=lambda: [1])
    #: bin_share statistical limit: mean + k * sigma of the bin's share over recent wafers.
    k: Annotated[float, Range(0, 100)] = 3.0
    min_wafers: Annotated[int, Range(2)] = 3
    recent_wafers: Annotated[int, Range(2)] = 10
    #: test_cpk: one test number, or every test when absent.
    test_num: Annotated[int, Range(0, 4_294_967_295)] | None = None
    min_samples: Annotated[int, Range(2)] = 30
    #: sensor_range: channel name pattern (shell-style) and the allowed range.
    channel: str = "*"
    low: float | None = None
    high: float | None = None
    #: gateway_offline: gateway id pattern and the seconds offline before alerting.
    gateway: str = "*"
    offline_s: Annotated[float, Range(0, 2_592_000)] = 60.0
    #: gateway_event: the lowest event level alerted, and the event codes (shell-style
    #: patterns; empty: every code).  The gateway id pattern is ``gateway`` above.
    level: EventLevel = "error"
    codes: list[str] = dataclasses.field(default_factory=list)
    #: every record-driven rule: lot id pattern.
    lot: str = "*"
    #: overrides the section's de-duplication window for this rule.
    dedup_window_s: Annotated[float, Range(0, 2_592_000)] | None = None
    enabled: bool = True

    @property
    def limit(self) -> float:
        """``threshold``, for the kinds that need one (``validate`` made sure it is set)."""
        if self.threshold is None:
            raise ValueError(f"alert rule {self.name!r} has no threshold")
        return self.threshold

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if not self.name or "/" in self.name or "+" in self.name or "#" in self.name:
            problems.append(("name", "must be non-empty without '/', '+' or '#'"))
        needs_threshold = ("wafer_yield", "lot_yield", "site_yield_gap", "test_cpk")
        if self.kind in needs_threshold and self.threshold is None:
            problems.append(("threshold", f"required for kind {self.kind!r}"))
        if self.kind in ("wafer_yield", "lot_yield", "site_yield_gap", "bin_share") and (
            self.threshold is not None and not 0 <= self.threshold <= 1
        ):
            problems.append(("threshold", "a yield, gap or share is between 0 and 1"))
        if self.kind == "sensor_range" and self.low is None and self.high is None:
            problems.append(("low", "sensor_range needs low, high or both"))
        if self.low is not None and self.high is not None and self.low > self.high:
            problems.append(("low", "must not be above high"))
        if self.count < 1:
            problems.append(("count", "must be at least 1"))
        if self.min_parts < 1:
            problems.append(("min_parts", "must be at least 1"))
        if self.min_wafers < 2:
            problems.append(("min_wafers", "a sigma needs at least 2 wafers"))
        if self.recent_wafers < self.min_wafers:
            problems.append(("recent_wafers", "must be at least min_wafers"))
        if self.offline_s < 0:
            problems.append(("offline_s", "must not be negative"))
        return problems


@dataclasses.dataclass(frozen=True)
class WebhookConfig:
    """One ``[[alerts.webhooks]]`` table: where alert events are POSTed as JSON."""

    url: str
    #: which priorities this webhook receives
    priorities: list[Priority] = dataclasses.field(
        default_factory=lambda: ["P0", "P1", "P2", "P3"]
    )
    #: which events: raised, acknowledged, escalated
    events: list[str] = dataclasses.field(
        default_factory=lambda: ["raised", "acknowledged", "escalated"]
    )
    timeout_s: Annotated[float, Range(0.1, 600)] = 5.0
    max_attempts: Annotated[int, Range(1, 1000)] = 8
    backoff_initial_s: Annotated[float, Range(0, 86_400, lo_open=True)] = 0.5
    backoff_max_s: Annotated[float, Range(0, 86_400, lo_open=True)] = 60.0
    #: an event not delivered when the hub restarted or the cluster's alert feed moved is
    #: sent again by the next one only while younger than this (seconds since queued)
    max_age_s: Annotated[float, Range(1, 30 * 86_400)] = 3600.0
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    # https://: the CA that signed the receiver's certificate (default: the system's)
    ca_file: str = ""
    # set: every POST carries X-Edgegw-Signature: sha256=<hex HMAC-SHA256 of the body>
    secret: str = dataclasses.field(default="", repr=False)

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if not self.url.startswith(("http://", "https://")):
            problems.append(("url", "must be an http:// or https:// URL"))
        if self.ca_file and not self.url.startswith("https://"):
            problems.append(("ca_file", "only for an https:// URL"))
        if self.secret and len(self.secret) < 16:
            problems.append(("secret", "must be at least 16 characters"))
        if self.max_attempts < 1:
            problems.append(("max_attempts", "must be at least 1"))
        if self.backoff_initial_s <= 0 or self.backoff_max_s < self.backoff_initial_s:
            problems.append(("backoff_initial_s", "need 0 < backoff_initial_s <= backoff_max_s"))
        bad = set(self.events) - {"raised", "acknowledged", "escalated"}
        if bad:
            problems.append(("events", f"unknown events {sorted(bad)}"))
        return problems


@dataclasses.dataclass(frozen=True)
class AlertsConfig:
    """The ``[alerts]`` section of hub.toml."""

    rules: list[AlertRuleConfig] = dataclasses.field(default_factory=list)
    webhooks: list[WebhookConfig] = dataclasses.field(default_factory=list)
    dedup_window_s: Annotated[float, Range(0, 2_592_000)] = 300.0
    escalate_after_s: Annotated[float, Range(0, 2_592_000)] = 120.0
    #: alerts kept in memory (the newest); older ones stay in the alert store.
    keep: Annotated[int, Range(1, 1_000_000)] = 1000

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        names = [r.name for r in self.rules]
        for i, name in enumerate(names):
            if name in names[:i]:
                problems.append((f"rules[{i}].name", f"duplicate rule name {name!r}"))
        if self.dedup_window_s < 0:
            problems.append(("dedup_window_s", "must not be negative"))
        if self.keep < 1:
            problems.append(("keep", "must be at least 1"))
        return problems
