"""What an uninterrupted single hub shows for a set of simulated testers: the reference the
cluster tests compare against (a helper module, not a fixture file).

The single hub's live state is ``LiveState`` fed each applied record once, in each
gateway's record order; the simulated tester is seeded and pure (``simulated_batches``), so
the reference is computed here in-process, without a hub, from the same source settings
the test's gateway processes run.  Fields that depend on wall-clock time (record times,
rates) cannot be equal between two runs of anything; they are found, not listed: the
reference is computed twice on two different clocks (start and pace) and every field that
differs is left out of the comparison (``comparable``).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from edgegw.hub.live import LiveState
from edgegw.sim import SimulatedConfig, simulated_batches


def reference_state(sources: dict[str, dict[str, Any]], t0: float = 1.7e9,
                    step: float = 0.01, alerts: Any = None) -> LiveState:
    """``sources``: gateway id -> simulated source settings.  Each gateway's batches are
    applied as frames in order (how they interleave between gateways does not matter:
    lots are per gateway here)."""
    engine = None
    if alerts is not None:  # an AlertsConfig: the single hub's alert engine, fed the same
        from edgegw.hub.alerts import AlertEngine

        engine = AlertEngine(alerts, lambda topic, delta: None)
    state = LiveState(lambda topic, delta: None, max_lots=1000, alerts=engine)
    for gw, settings in sources.items():
        ticks = itertools.count()

        def clock(ticks: itertools.count[int] = ticks) -> float:
            return t0 + next(ticks) * step
        cfg = SimulatedConfig(**settings)
        rid = 1
        for batch, _ in simulated_batches(cfg, "tester", clock=clock):
            state.on_records(gw, rid, batch, now=t0)
            rid += len(batch)
    return state


def lot_topics(state: LiveState) -> dict[str, Any]:
    """Every ``lot/...`` and ``test/...`` topic's snapshot."""
    return {t: state.snapshot(t) for t in state.topics() if t.startswith(("lot/", "test/"))}


def _volatile(a: Any, b: Any, path: tuple[Any, ...], out: set[tuple[Any, ...]]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            _volatile(a.get(k), b.get(k), (*path, k), out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for x, y in zip(a, b, strict=True):
            _volatile(x, y, (*path, "*"), out)
    elif a != b:
        out.add(path)


def volatile_fields(sources: dict[str, dict[str, Any]],
                    state: LiveState | None = None) -> set[tuple[Any, ...]]:
    """Paths (topic kind, key, ...) whose values depend on the clock.  ``state``: the
    caller's ``reference_state(sources)`` (default clock), if it has one (not made again)."""
    a = lot_topics(reference_state(sources, 1.7e9) if state is None else state)
    b = lot_topics(reference_state(sources, 1.8e9, 0.013))
    out: set[tuple[Any, ...]] = set()
    for topic in set(a) | set(b):
        _volatile(a.get(topic), b.get(topic), (_kind(topic),), out)
    return out


def _kind(topic: str) -> str:
    parts = topic.split("/")
    return "wafer" if len(parts) == 4 else parts[0]


def comparable(views: dict[str, Any], volatile: set[tuple[Any, ...]]) -> dict[str, Any]:
    """``views`` (topic -> snapshot or view) without the clock-dependent fields, with die
    rows keyed by location (their order follows arrival, not meaning) and numbers to 9
    significant digits (the rounding of running statistics follows arrival too)."""
    def strip(value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, dict):
            return {k: strip(v, (*path, k)) for k, v in sorted(value.items(), key=str)
                    if (*path, k) not in volatile}
        if isinstance(value, list):
            rows = [strip(v, (*path, "*")) for v in value]
            if path[-1:] == ("dies",):
                return sorted(rows, key=lambda r: (str(r[0]), str(r[1])))
            return rows
        if isinstance(value, float) and math.isfinite(value):
            # running statistics (mean, sigma, Cpk) of the same records applied in another
            # order -- frames a gateway resent after an outage land after later ones --
            # differ in the last bits: equal to 9 significant digits is equal
            return float(f"{value:.9g}")
        return value
    return {t: strip(v, (_kind(t),)) for t, v in views.items()
            if t.startswith(("lot/", "test/"))}


__all__ = ["comparable", "lot_topics", "reference_state", "volatile_fields"]
