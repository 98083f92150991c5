"""The alert engine: live figures and time in, alert events out (sans-IO).

The engine is fed by ``LiveState`` (``edgegw.hub.live``) as records are applied: each
part (for runs of fails on a site), each changed wafer, lot and test (for yield, site
gap, bin share and Cpk rules), each sensor value, and each gateway connection change; the
hub calls ``tick(now)`` about once a second for what depends on time alone (a gateway
offline too long, an unacknowledged P0 to escalate).

Every alert event (``raised``, ``acknowledged``, ``escalated``) is published on the topic
``alert/<priority>/<rule>`` and handed to ``sink`` -- the Trio layer
(``edgegw.hub.alerts.service``) persists it and delivers it to the configured webhooks.

Time.  An alert raised from records carries the *record* time of the data that tripped
it (``raised_at``), and de-duplication by alert key compares record times: the same
condition on the same key within ``dedup_window_s`` raises nothing new (the existing
alert's ``occurrences`` grows).  That makes replay after a hub restart harmless: replayed
records re-trip the same keys at the same record times, which the restored alerts already
cover, so nothing is raised or delivered twice.  ``notified_at`` is the hub's own clock
when the alert was raised; escalation (``escalate_after_s``, default 2 min, P0 only) counts
from it, so an alert raised from an old backlog is not escalated the moment it appears.
``now`` is the wall clock (a date); how long a gateway has been offline and a P0 waited
is measured by ``elapsed``, a monotonic clock, when the engine is given one (the hub is):
a wall clock set an hour forward is no hour offline, nor set back an hour's delay.
A hub cluster's owners pass a clock every node reads alike (Redis's, ``shared=True``):
its readings are then kept with the alert (``notified_clock``, the context's
``offline_clock``), so a new owner measures an alert or outage begun under another node
by the same clock, whatever either node's wall clock says.

The rule reference (every key, with examples) is ``docs/alerts.md``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from edgegw.hub import topics
from edgegw.hub.live.checks import is_num
from edgegw.hub.live.models import site_names
from edgegw.metrics import Metrics
from edgegw.records import GatewayEvent, PartResult, SensorReading, SensorWindow

from .config import RULE_KINDS, AlertRuleConfig, AlertsConfig

if TYPE_CHECKING:
    from edgegw.hub.live.models import LotState, TestStats, WaferState

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
    #: the shared clock (a hub cluster: Redis's) when notified, for escalation by a later
    #: owner; None on a single hub (its monotonic clock is its own)
    notified_clock: float | None = None

    @property
    def topic(self) -> str:
        return topics.alert(self.priority, self.rule)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alert:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclasses.dataclass(frozen=True)
class RuleChanges:
    """The rule names a reconfiguration added, removed and changed."""

    added: list[str]
    removed: list[str]
    changed: list[str]

    @property
    def summary(self) -> str:
        parts = [f"{what} {', '.join(names)}" for what, names in (
            ("added", self.added), ("removed", self.removed), ("changed", self.changed))
            if names]
        return "; ".join(parts) if parts else "no rule added, removed or changed"


AlertEvent = dict[str, Any]
Publish = Callable[[str, dict[str, Any]], None]

#: alerts kept per alert topic for its snapshot
_PER_TOPIC = 50
#: a GatewayEvent's levels, in order; one not known (a newer gateway's) counts as an error
_LEVELS = {"info": 0, "warning": 1, "error": 2}
#: an event's message is cut to this many characters in its alert
_EVENT_MESSAGE_CHARS = 500
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
        elapsed: Callable[[], float] | None = None,
        shared: bool = False,
    ) -> None:
        """``elapsed``: a monotonic clock for durations (None: the ``now`` passed in);
        ``shared``: it reads the same in every process that restores these alerts (a hub
        cluster: Redis's clock), so its readings are kept with them."""
        self.config = config
        self._elapsed = elapsed
        self._shared = shared and elapsed is not None
        #: ``elapsed()`` when a gateway went offline and a P0 was raised, with a clock
        self._offline_at: dict[str, float] = {}
        self._notified_at: dict[str, float] = {}
        self._publish = publish
        self._sink = sink
        self._by_kind: dict[str, list[AlertRuleConfig]] = self._index(config)
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

    @staticmethod
    def _index(config: AlertsConfig) -> dict[str, list[AlertRuleConfig]]:
        by_kind: dict[str, list[AlertRuleConfig]] = {k: [] for k in RULE_KINDS}
        for rule in config.rules:
            if rule.enabled:
                by_kind[rule.kind].append(rule)
        return by_kind

    def reconfigure(self, config: AlertsConfig) -> RuleChanges:
        """Take the rules (and windows, ``keep``) of ``config`` from now on -- the hub's
        SIGHUP.  A rule changed or removed forgets what it was counting (a run of fails, a
        bin's recent shares): its new definition starts afresh rather than judging a run
        counted under the old one.  The alerts already raised stay as they are (listed,
        acknowledgeable, a P0 still escalated), whatever happened to their rule."""
        old = {r.name: r for r in self.config.rules}
        new = {r.name: r for r in config.rules}
        changes = RuleChanges(
            added=sorted(set(new) - set(old)), removed=sorted(set(old) - set(new)),
            changed=sorted(n for n in set(old) & set(new) if old[n] != new[n]))
        gone = set(changes.removed) | set(changes.changed)
        self._runs = {k: v for k, v in self._runs.items() if k[0] not in gone}
        self._shares = {k: v for k, v in self._shares.items() if k[0] not in gone}
        self.config = config
        self._by_kind = self._index(config)
        self._trim()  # a smaller ``keep``: the oldest leave memory
        return changes

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
            if tally.dies >= rule.min_parts and y is not None and y < rule.limit:
                self._raise(rule, f"{rule.name}|{base}", ts, now,
                            f"wafer {wafer.wafer_id} of lot {lot.lot_id}: yield {y:.1%} "
                            f"below {rule.threshold:.1%} after {tally.dies} dies",
                            y, rule.threshold, {**ctx, "dies": tally.dies})
        for rule in self._rules("site_yield_gap", lot.lot_id):
            # by site name: a site is (head, site) (``site_names``, as the wafer's ``sites``);
            # a plain site number stays the int it always was in the alert's context
            yields: dict[Any, float] = {
                int(name) if "/" not in name else name: tally.site_good[s] / tally.site_dies[s]
                for s, name in site_names(
                    s for s, n in tally.site_dies.items() if n >= rule.min_parts)
            }
            if len(yields) < 2:
                continue
            best = max(yields, key=yields.__getitem__)
            worst = min(yields, key=yields.__getitem__)
            gap = yields[best] - yields[worst]
            if gap > rule.limit:
                self._raise(rule, f"{rule.name}|{base}", ts, now,
                            f"wafer {wafer.wafer_id} of lot {lot.lot_id}: site {worst} yield "
                            f"{yields[worst]:.1%} is {gap:.1%} below site {best} "
                            f"({yields[best]:.1%})",
                            gap, rule.threshold,
                            {**ctx, "worst_site": worst, "best_site": best,
                             "site_yields": {str(s): v for s, v in yields.items()}})
        for rule in self._rules("bin_share", lot.lot_id):
            if tally.dies < rule.min_parts:
                continue
            history = self._shares.get((rule.name, lot.info.get("part_type", "")))
            for bin_num in self._watched_bins(rule, tally.hard):
                share = tally.hard.get(bin_num, 0) / tally.dies
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
            if tally.dies >= rule.min_parts and y is not None and y < rule.limit:
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
            if cpk is not None and cpk < rule.limit:
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

    def on_gateway_event(self, gateway_id: str, rec: GatewayEvent, now: float) -> None:
        """A ``GatewayEvent`` record applied: what the gateway reports of itself (a source
        failed, frames dropped at a full store, records refused, its state restored from
        a copy).  Keyed by rule, gateway and code: the same code again within the window
        is one alert (its ``occurrences`` grows).  Raised at the event's own time, like
        every record-driven alert, so a replay raises nothing twice.  An event whose time
        is no finite number, or whose level or code is no text, alerts nothing."""
        rules = self._by_kind["gateway_event"]
        if not rules or not isinstance(rec.code, str) or not isinstance(rec.level, str):
            return
        ts = rec.ts
        if not is_num(ts) or not math.isfinite(ts):
            return
        rank = _LEVELS.get(rec.level, _LEVELS["error"])
        for rule in rules:
            if rank < _LEVELS[rule.level] or not fnmatch.fnmatchcase(gateway_id, rule.gateway):
                continue
            if rule.codes and not any(fnmatch.fnmatchcase(rec.code, c) for c in rule.codes):
                continue
            text = str(rec.message)[:_EVENT_MESSAGE_CHARS]
            self._raise(rule, f"{rule.name}|{gateway_id}|{rec.code}", float(ts), now,
                        f"gateway {gateway_id}: {rec.level} {rec.code}: {text}", None, None,
                        {"gateway_id": gateway_id, "code": rec.code, "level": rec.level,
                         "source": str(rec.source)})

    def on_gateway(self, gateway_id: str, connected: bool, now: float, *,
                   began: float | None = None) -> None:
        """The gateway is (not) connected.  ``began``: when it went offline by ``elapsed``,
        if known (a hub cluster: its last-seen time on the shared clock), else now -- so
        an outage that began while no one watched (its partition moving to this owner)
        is timed from its start, not from when this engine first hears of it.  A
        ``began`` after the outage held (one restored from an earlier owner's alert):
        the gateway was back since, and this is a new outage."""
        if connected:
            self._offline_since.pop(gateway_id, None)
            self._offline_at.pop(gateway_id, None)
            return
        held = self._offline_at.get(gateway_id)
        if gateway_id in self._offline_since and (
                began is None or held is None or began <= held):
            return
        self._offline_since[gateway_id] = now
        if self._elapsed is not None:
            at = self._elapsed()
            if began is not None:
                # the date shown goes back by the same span as the shared clock (a began
                # a hair ahead -- two nodes' readings of it -- is taken as now)
                self._offline_since[gateway_id] = now - max(0.0, at - began)
                at = began
            self._offline_at[gateway_id] = at

    def _since(self, at: float | None, wall_since: float, now: float) -> float:
        """Seconds since ``at`` by the monotonic clock, or (without one, or for what began
        in another process) since the date ``wall_since`` by ``now``."""
        if at is None or self._elapsed is None:
            return now - wall_since
        return self._elapsed() - at

    def tick(self, now: float) -> None:
        """Time-driven rules: gateways offline too long, P0 escalation."""
        for gateway_id, since in list(self._offline_since.items()):
            for rule in self._by_kind["gateway_offline"]:
                if not fnmatch.fnmatchcase(gateway_id, rule.gateway):
                    continue
                offline = self._since(self._offline_at.get(gateway_id), since, now)
                if offline >= rule.offline_s:
                    context: dict[str, Any] = {"gateway_id": gateway_id,
                                               "offline_since": since}
                    at = self._offline_at.get(gateway_id)
                    if self._shared and at is not None:
                        context["offline_clock"] = at
                    self._raise(rule, f"{rule.name}|{gateway_id}|{since:.3f}",
                                since + rule.offline_s, now,
                                f"gateway {gateway_id} offline for {offline:.0f} s "
                                f"(limit {rule.offline_s:.0f} s)",
                                offline, rule.offline_s, context)
        after = self.config.escalate_after_s
        for alert_id, alert in list(self._unescalated_p0.items()):
            if alert.acknowledged:
                del self._unescalated_p0[alert_id]
                self._notified_at.pop(alert_id, None)
            elif self._since(self._notified_at.get(alert_id), alert.notified_at, now) >= after:
                del self._unescalated_p0[alert_id]
                self._notified_at.pop(alert_id, None)
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
            self._notified_at.pop(alert_id, None)
            self._emit("acknowledged", alert, now)
        return alert

    def note_ack(self, alert_id: str, user: str | None, at: float | None) -> bool:
        """An acknowledgement recorded elsewhere (a hub cluster: on another node, read back
        from the store): stop escalating the alert, emit nothing (whoever recorded it
        announces it).  False for an unknown or already acknowledged alert."""
        alert = self.alerts.get(alert_id)
        if alert is None or alert.acknowledged:
            return False
        alert.acknowledged = True
        alert.acked_by = user
        alert.acked_at = at
        self._unescalated_p0.pop(alert_id, None)
        self._notified_at.pop(alert_id, None)
        return True

    def resume_outage(self, gateway_id: str, since: float, at: float | None = None) -> None:
        """A gateway's outage that started at ``since`` and is already alerted (a hub
        cluster: an earlier owner raised it): kept as the same outage, so its
        ``gateway_offline`` alert (keyed by its start) is not raised again.  The next
        ``on_gateway(..., True)`` ends it.  ``at``: its start by the shared clock (the
        alert's ``offline_clock``), if the engine has one."""
        self._offline_since[gateway_id] = since
        if self._shared and at is not None:
            self._offline_at[gateway_id] = at
        else:
            self._offline_at.pop(gateway_id, None)  # (began elsewhere: measured by dates)

    def watches(self, kind: str) -> bool:
        """Whether an enabled rule of ``kind`` is configured."""
        return bool(self._by_kind.get(kind))

    @property
    def escalation_pending(self) -> int:
        """Unacknowledged P0 alerts not escalated yet."""
        return len(self._unescalated_p0)

    def restore(self, alerts: Iterable[dict[str, Any]]) -> int:
        """Load persisted alerts (oldest first) before the hub replays its records."""
        n = 0
        for data in alerts:
            alert = Alert.from_dict(data)
            self._remember(alert)
            if alert.priority == "P0" and not alert.acknowledged and not alert.escalated:
                self._unescalated_p0[alert.id] = alert
                if self._shared and alert.notified_clock is not None:
                    # raised by another node: counted on the clock both read alike
                    self._notified_at[alert.id] = alert.notified_clock
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
            if self._elapsed is not None:
                self._notified_at[alert.id] = self._elapsed()
                if self._shared:
                    alert.notified_clock = self._notified_at[alert.id]
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
        self._trim()

    def _trim(self) -> None:
        """The newest ``keep`` alerts stay in memory (all are in the store)."""
        while len(self.alerts) > self.config.keep:
            _, old = self.alerts.popitem(last=False)
            if self._by_key.get(old.key) is old:
                del self._by_key[old.key]
            self._unescalated_p0.pop(old.id, None)
            self._notified_at.pop(old.id, None)

    def _emit(self, event: str, alert: Alert, now: float) -> None:
        self._m_events.inc(event=event, priority=alert.priority)
        payload = {"event": event, "ts": now, "alert": alert.to_dict()}
        self._publish(alert.topic, payload)
        if self._sink is not None:
            self._sink(payload)
