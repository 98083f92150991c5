"""Alert rules and the alert engine: live figures and time in, alert events out (sans-IO).

The engine is fed by ``LiveState`` (``edgegw.hub.state``) as records are applied: each
part (for runs of fails on a site), each changed wafer, lot and test (for yield, site
gap, bin share and Cpk rules), each sensor value, and each gateway connection change; the
hub calls ``tick(now)`` about once a second for what depends on time alone (a gateway
offline too long, an unacknowledged P0 to escalate).

Every alert event (``raised``, ``acknowledged``, ``escalated``) is published on the topic
``alert/<priority>/<rule>`` and handed to ``sink`` -- the Trio layer
(``edgegw.hub.alert_service``) persists it and delivers it to the configured webhooks.

Time.  An alert raised from records carries the *record* time of the data that tripped
it (``raised_at``), and de-duplication by alert key compares record times: the same
condition on the same key within ``dedup_window_s`` raises nothing new (the existing
alert's ``occurrences`` grows).  That makes replay after a hub restart harmless: replayed
records re-trip the same keys at the same record times, which the restored alerts already
cover, so nothing is raised or delivered twice.  ``notified_at`` is the hub's own clock
when the alert was raised; escalation (``escalate_after_s``, default 2 min, P0 only) counts
from it, so an alert raised from an old backlog is not escalated the moment it appears.

The rule reference (every key, with examples) is ``docs/alerts.md``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from edgegw.config import Range
from edgegw.hub import topics
from edgegw.metrics import Metrics
from edgegw.records import PartResult, SensorReading, SensorWindow

if TYPE_CHECKING:
    from edgegw.hub.state import LotState, TestStats, WaferState

Priority = Literal["P0", "P1", "P2", "P3"]
RuleKind = Literal[
    "wafer_yield",
    "lot_yield",
    "consecutive_fails",
    "site_yield_gap",
    "bin_share",
    "test_cpk",
    "sensor_range",
    "gateway_offline",
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
    #: every record-driven rule: lot id pattern.
    lot: str = "*"
    #: overrides the section's de-duplication window for this rule.
    dedup_window_s: Annotated[float, Range(0, 2_592_000)] | None = None
    enabled: bool = True

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


@dataclasses.dataclass
class Alert:
    id: str
    rule: str
    kind: str
    priority: str
    key: str
    message: str
    value: float | None
    threshold: float | None
    context: dict[str, Any]
    raised_at: float
    notified_at: float
    last_seen: float
    occurrences: int = 1
    acknowledged: bool = False
    acked_by: str | None = None
    acked_at: float | None = None
    escalated: bool = False
    escalated_at: float | None = None

    @property
    def topic(self) -> str:
        return topics.alert(self.priority, self.rule)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alert:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


AlertEvent = dict[str, Any]
Publish = Callable[[str, dict[str, Any]], None]

#: alerts kept per alert topic for its snapshot
_PER_TOPIC = 50
#: (rule, lot, head, site) fail runs remembered; bounded across months of lots
_MAX_RUNS = 10_000


def _alert_id(key: str, raised_at: float) -> str:
    # Deterministic: replaying the same records yields the same id.
    return hashlib.sha1(f"{key}@{raised_at:.6f}".encode()).hexdigest()[:16]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


class AlertEngine:
    """Evaluates the configured rules; raises, de-duplicates, acknowledges, escalates."""

    def __init__(
        self,
        config: AlertsConfig,
        publish: Publish,
        *,
        sink: Callable[[AlertEvent], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self._publish = publish
        self._sink = sink
        rules = [r for r in config.rules if r.enabled]
        self._by_kind: dict[str, list[AlertRuleConfig]] = {k: [] for k in RULE_KINDS}
        for rule in rules:
            self._by_kind[rule.kind].append(rule)
        self.alerts: OrderedDict[str, Alert] = OrderedDict()
        self._by_key: dict[str, Alert] = {}
        self._by_topic: dict[str, deque[Alert]] = {}
        self._unescalated_p0: dict[str, Alert] = {}
        self._runs: dict[tuple[str, str, int, int], int] = {}
        self._offline_since: dict[str, float] = {}
        self._shares: dict[tuple[str, str], deque[dict[int, float]]] = {}
        metrics = metrics or Metrics()
        self._m_events = metrics.counter("hub_alert_events_total", "alert events by kind")
        self._m_suppressed = metrics.counter(
            "hub_alerts_deduplicated_total", "alert conditions suppressed as duplicates"
        )

    # ------------------------------------------------------------------ inputs

    def on_part(self, lot: LotState, wafer: WaferState, rec: PartResult, gateway_id: str,
                now: float) -> None:
        rules = self._by_kind["consecutive_fails"]
        if not rules or rec.passed is None:
            return
        for rule in rules:
            if not fnmatch.fnmatchcase(lot.lot_id, rule.lot):
                continue
            run_key = (rule.name, lot.lot_id, rec.head, rec.site)
            if rec.passed:
                self._runs.pop(run_key, None)
                continue
            run = self._runs[run_key] = self._runs.get(run_key, 0) + 1
            if len(self._runs) > _MAX_RUNS:  # old lots' sites: forget the oldest run
                del self._runs[next(iter(self._runs))]
            if run >= rule.count:
                self._raise(
                    rule, f"{rule.name}|{lot.lot_id}|{rec.head}|{rec.site}", rec.ts, now,
                    f"{run} consecutive fails on site {rec.site} (head {rec.head}) in lot "
                    f"{lot.lot_id}",
                    run, rule.count,
                    {"lot_id": lot.lot_id, "wafer_id": wafer.wafer_id, "head": rec.head,
                     "site": rec.site, "gateway_id": gateway_id, "part_id": rec.part_id},
                )

    def evaluate_wafer(self, lot: LotState, wafer: WaferState, ts: float, now: float) -> None:
        tally = wafer.tally
        ctx = {"lot_id": lot.lot_id, "wafer_id": wafer.wafer_id}
        base = f"{lot.lot_id}|{wafer.wafer_id}"
        for rule in self._rules("wafer_yield", lot.lot_id):
            y = tally.yield_
            if tally.dies >= rule.min_parts and y is not None and y < rule.threshold:
                self._raise(rule, f"{rule.name}|{base}", ts, now,
                            f"wafer {wafer.wafer_id} of lot {lot.lot_id}: yield {y:.1%} "
                            f"below {rule.threshold:.1%} after {tally.dies} dies",
                            y, rule.threshold, {**ctx, "dies": tally.dies})
        for rule in self._rules("site_yield_gap", lot.lot_id):
            yields = {
                s: tally.site_good[s] / n
                for s, n in tally.site_dies.items()
                if n >= rule.min_parts
            }
            if len(yields) < 2:
                continue
            best = max(yields, key=yields.__getitem__)
            worst = min(yields, key=yields.__getitem__)
            gap = yields[best] - yields[worst]
            if gap > rule.threshold:
                self._raise(rule, f"{rule.name}|{base}", ts, now,
                            f"wafer {wafer.wafer_id} of lot {lot.lot_id}: site {worst} yield "
                            f"{yields[worst]:.1%} is {gap:.1%} below site {best} "
                            f"({yields[best]:.1%})",
                            gap, rule.threshold,
                            {**ctx, "worst_site": worst, "best_site": best,
                             "site_yields": {str(s): v for s, v in sorted(yields.items())}})
        for rule in self._rules("bin_share", lot.lot_id):
            if tally.dies < rule.min_parts:
                continue
            history = self._shares.get((rule.name, lot.info.get("part_type", "")))
            for bin_num in self._watched_bins(rule, tally.hard):
                share = tally.hard[bin_num] / tally.dies
                limit = self._bin_limit(rule, history, bin_num)
                if limit is not None and share > limit:
                    self._raise(rule, f"{rule.name}|{base}|{bin_num}", ts, now,
                                f"wafer {wafer.wafer_id} of lot {lot.lot_id}: hard bin "
                                f"{bin_num} share {share:.1%} above its limit {limit:.1%}",
                                share, limit, {**ctx, "bin": bin_num, "dies": tally.dies})

    def wafer_closed(self, lot: LotState, wafer: WaferState) -> None:
        """A finished wafer joins the history behind statistical bin limits."""
        tally = wafer.tally
        for rule in self._rules("bin_share", lot.lot_id):
            if rule.threshold is not None or tally.dies < rule.min_parts:
                continue
            key = (rule.name, lot.info.get("part_type", ""))
            history = self._shares.get(key)
            if history is None:
                history = self._shares[key] = deque(maxlen=rule.recent_wafers)
            history.append({b: n / tally.dies for b, n in tally.hard.items() if n})

    def evaluate_lot(self, lot: LotState, ts: float, now: float) -> None:
        tally = lot.tally
        for rule in self._rules("lot_yield", lot.lot_id):
            y = tally.yield_
            if tally.dies >= rule.min_parts and y is not None and y < rule.threshold:
                self._raise(rule, f"{rule.name}|{lot.lot_id}", ts, now,
                            f"lot {lot.lot_id}: yield {y:.1%} below {rule.threshold:.1%} "
                            f"after {tally.dies} dies",
                            y, rule.threshold, {"lot_id": lot.lot_id, "dies": tally.dies})

    def evaluate_test(self, stats: TestStats, ts: float, now: float) -> None:
        for rule in self._rules("test_cpk", stats.lot_id):
            if rule.test_num is not None and rule.test_num != stats.test_num:
                continue
            if stats.count < rule.min_samples:
                continue
            cpk = stats.cpk
            if cpk is not None and cpk < rule.threshold:
                self._raise(rule, f"{rule.name}|{stats.lot_id}|{stats.test_num}", ts, now,
                            f"lot {stats.lot_id}: test {stats.test_num} {stats.test_txt} Cpk "
                            f"{cpk:.3g} below {rule.threshold:.3g} (mean {_fmt(stats.mean)}, "
                            f"sigma {_fmt(stats.sigma)}, n={stats.count})",
                            cpk, rule.threshold,
                            {"lot_id": stats.lot_id, "test_num": stats.test_num,
                             "test_txt": stats.test_txt, "mean": stats.mean,
                             "sigma": stats.sigma, "count": stats.count})

    def on_sensor(self, rec: SensorWindow | SensorReading, now: float) -> None:
        rules = self._by_kind["sensor_range"]
        if not rules:
            return
        if isinstance(rec, SensorWindow):
            lo_value, hi_value = rec.min, rec.max
        else:
            lo_value = hi_value = rec.value
        for rule in rules:
            if not fnmatch.fnmatchcase(rec.channel, rule.channel):
                continue
            if rule.high is not None and hi_value > rule.high:
                value, limit, side = hi_value, rule.high, "above"
            elif rule.low is not None and lo_value < rule.low:
                value, limit, side = lo_value, rule.low, "below"
            else:
                continue
            self._raise(rule, f"{rule.name}|{rec.channel}", rec.ts, now,
                        f"sensor {rec.channel}: {value:.4g}{rec.unit} {side} {limit:.4g}"
                        f"{rec.unit}",
                        value, limit, {"channel": rec.channel, "unit": rec.unit,
                                       "source": rec.source})

    def on_gateway(self, gateway_id: str, connected: bool, now: float) -> None:
        if connected:
            self._offline_since.pop(gateway_id, None)
        else:
            self._offline_since.setdefault(gateway_id, now)

    def tick(self, now: float) -> None:
        """Time-driven rules: gateways offline too long, P0 escalation."""
        for gateway_id, since in list(self._offline_since.items()):
            for rule in self._by_kind["gateway_offline"]:
                if not fnmatch.fnmatchcase(gateway_id, rule.gateway):
                    continue
                if now - since >= rule.offline_s:
                    self._raise(rule, f"{rule.name}|{gateway_id}|{since:.3f}",
                                since + rule.offline_s, now,
                                f"gateway {gateway_id} offline for {now - since:.0f} s "
                                f"(limit {rule.offline_s:.0f} s)",
                                now - since, rule.offline_s,
                                {"gateway_id": gateway_id, "offline_since": since})
        after = self.config.escalate_after_s
        for alert_id, alert in list(self._unescalated_p0.items()):
            if alert.acknowledged:
                del self._unescalated_p0[alert_id]
            elif now - alert.notified_at >= after:
                del self._unescalated_p0[alert_id]
                alert.escalated = True
                alert.escalated_at = now
                self._emit("escalated", alert, now)

    # ------------------------------------------------------------------ users

    def ack(self, alert_id: str, user: str, now: float) -> Alert:
        """Acknowledge an alert; raises KeyError for an unknown id.  Acknowledging twice
        keeps the first acknowledgement and emits nothing."""
        alert = self.alerts[alert_id]
        if not alert.acknowledged:
            alert.acknowledged = True
            alert.acked_by = user
            alert.acked_at = now
            self._unescalated_p0.pop(alert_id, None)
            self._emit("acknowledged", alert, now)
        return alert

    def restore(self, alerts: Iterable[dict[str, Any]]) -> int:
        """Load persisted alerts (oldest first) before the hub replays its records."""
        n = 0
        for data in alerts:
            alert = Alert.from_dict(data)
            self._remember(alert)
            if alert.priority == "P0" and not alert.acknowledged and not alert.escalated:
                self._unescalated_p0[alert.id] = alert
            n += 1
        return n

    # ------------------------------------------------------------------ queries

    def snapshot(self, priority: str, rule: str) -> dict[str, Any] | None:
        if priority not in topics.PRIORITIES:
            return None
        recent = self._by_topic.get(topics.alert(priority, rule))
        if not recent:
            return None
        return {
            "priority": priority,
            "rule": rule,
            "alerts": [a.to_dict() for a in reversed(recent)],
        }

    def topics(self) -> list[str]:
        return [t for t, recent in self._by_topic.items() if recent]

    def list_alerts(self, *, unacknowledged: bool = False, priority: str | None = None,
             limit: int = 100) -> list[Alert]:
        """Newest first."""
        out: list[Alert] = []
        for alert in reversed(self.alerts.values()):
            if unacknowledged and alert.acknowledged:
                continue
            if priority is not None and alert.priority != priority:
                continue
            out.append(alert)
            if len(out) >= limit:
                break
        return out

    # ------------------------------------------------------------------ internals

    def _rules(self, kind: str, lot_id: str) -> list[AlertRuleConfig]:
        return [r for r in self._by_kind[kind] if fnmatch.fnmatchcase(lot_id, r.lot)]

    @staticmethod
    def _watched_bins(rule: AlertRuleConfig, hard: dict[int, int]) -> list[int]:
        if rule.bins:
            return list(rule.bins)
        return [b for b, n in hard.items() if n and b not in rule.good_bins]

    @staticmethod
    def _bin_limit(rule: AlertRuleConfig, history: deque[dict[int, float]] | None,
                   bin_num: int) -> float | None:
        if rule.threshold is not None:
            return rule.threshold
        if history is None or len(history) < rule.min_wafers:
            return None
        shares = [wafer.get(bin_num, 0.0) for wafer in history]
        mean = sum(shares) / len(shares)
        sigma = math.sqrt(sum((s - mean) ** 2 for s in shares) / (len(shares) - 1))
        return mean + rule.k * sigma

    def _raise(self, rule: AlertRuleConfig, key: str, ts: float, now: float, message: str,
               value: float | None, threshold: float | None, context: dict[str, Any]) -> None:
        existing = self._by_key.get(key)
        if existing is not None:
            if ts <= existing.last_seen:
                return  # replayed or late data already covered by this alert
            window = (rule.dedup_window_s if rule.dedup_window_s is not None
                      else self.config.dedup_window_s)
            if ts - existing.raised_at < window:
                existing.last_seen = ts
                existing.occurrences += 1
                self._m_suppressed.inc(rule=rule.name)
                return
        alert_id = _alert_id(key, ts)
        if alert_id in self.alerts:
            return
        alert = Alert(
            id=alert_id, rule=rule.name, kind=rule.kind, priority=rule.priority, key=key,
            message=message, value=value, threshold=threshold, context=context,
            raised_at=ts, notified_at=now, last_seen=ts,
        )
        self._remember(alert)
        if alert.priority == "P0":
            self._unescalated_p0[alert.id] = alert
        self._emit("raised", alert, now)

    def _remember(self, alert: Alert) -> None:
        self.alerts[alert.id] = alert
        self.alerts.move_to_end(alert.id)
        current = self._by_key.get(alert.key)
        if current is None or alert.raised_at >= current.raised_at:
            self._by_key[alert.key] = alert
        recent = self._by_topic.get(alert.topic)
        if recent is None:
            recent = self._by_topic[alert.topic] = deque(maxlen=_PER_TOPIC)
        recent.append(alert)
        while len(self.alerts) > self.config.keep:
            _, old = self.alerts.popitem(last=False)
            if self._by_key.get(old.key) is old:
                del self._by_key[old.key]
            self._unescalated_p0.pop(old.id, None)

    def _emit(self, event: str, alert: Alert, now: float) -> None:
        self._m_events.inc(event=event, priority=alert.priority)
        payload = {"event": event, "ts": now, "alert": alert.to_dict()}
        self._publish(alert.topic, payload)
        if self._sink is not None:
            self._sink(payload)
