"""Counters, gauges and histograms, exported in the Prometheus text format by
``prometheus_client`` and as JSON.

The hot path adds to plain dictionaries (``bench/metrics_cost.py``: cheaper than a
``prometheus_client`` child with its lock and ``labels()`` lookup); the exposition is
``prometheus_client``'s own, through a custom collector, so values are exact and names,
types and escaping follow the format's reference.  Each ``Metrics`` has its own
``prometheus_client`` registry with the process collector (memory, fds, CPU), the Python
platform and GC collectors and ``edgegw_build_info``.  Every bad input the service
survives is counted here, so health never stays green while data is being thrown away.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import Metric as Family
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

LabelKey = tuple[tuple[str, str], ...]

#: for latencies: 1 ms .. 10 s (and +Inf)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: for ages of data (record creation -> applied, window end -> sent): 10 ms .. 1 h
AGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


def _key(labels: dict[str, Any]) -> LabelKey:
    if len(labels) == 1:  # most labelled series (a put's source): no generator, no sort
        for k, v in labels.items():
            return ((k, str(v)),)
    return tuple(sorted((k, str(v)) for k, v in labels.items())) if labels else ()


class Metric:
    """A counter or a gauge: one value per label set."""

    def __init__(self, name: str, help: str, kind: str) -> None:
        self.name = name
        self.help = help
        self.kind = kind
        self.values: dict[LabelKey, float] = {}

    _key = staticmethod(_key)

    def inc(self, amount: float = 1, **labels: Any) -> None:
        key = _key(labels) if labels else ()
        self.values[key] = self.values.get(key, 0) + amount

    def set(self, value: float, **labels: Any) -> None:
        self.values[_key(labels)] = value

    def get(self, **labels: Any) -> float:
        return self.values.get(_key(labels), 0)

    def total(self) -> float:
        return sum(self.values.values())

    def family(self, full: str) -> Family:
        # a counter's family is named without ``_total``; its samples carry it
        fam = Family(full[:-6] if self.kind == "counter" else full, self.help, self.kind)
        sample = f"{fam.name}_total" if self.kind == "counter" else fam.name
        # a metric nothing has touched yet still exports (as 0), so queries resolve
        for key, val in self.values.items() or [((), 0.0)]:
            fam.add_sample(sample, dict(key), val)
        return fam


class Histogram:
    """Observations counted into fixed buckets (``le`` upper bounds, +Inf implied)."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float]) -> None:
        self.name = name
        self.help = help
        self.buckets = tuple(sorted(float(b) for b in buckets))
        #: label set -> [per-bucket counts (not cumulative, last is +Inf), sum]
        self.series: dict[LabelKey, tuple[list[int], list[float]]] = {}

    def _series(self, labels: dict[str, Any]) -> tuple[list[int], list[float]]:
        key = _key(labels) if labels else ()
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = ([0] * (len(self.buckets) + 1), [0.0])
        return s

    def observe(self, value: float, **labels: Any) -> None:
        counts, total = self._series(labels)
        counts[bisect_left(self.buckets, value)] += 1
        total[0] += value

    def observe_many(self, values: Iterable[float], **labels: Any) -> None:
        """Many observations with one label lookup (per record, on the hot path).

        Sorted once (in C; record ages of a frame are nearly sorted already) and cut at
        the bucket bounds: a few bisections per frame instead of one per value, about a
        quarter of the per-value loop's cost at a frame of 2,000 records."""
        counts, total = self._series(labels)
        vals = sorted(values)
        s = sum(vals)
        if s != s:  # NaN among them: it does not sort; counted one by one as observe does
            for v in vals:
                counts[bisect_left(self.buckets, v)] += 1
        else:
            below = 0  # values in the buckets so far: bucket i holds (bound i-1, bound i]
            for i, bound in enumerate(self.buckets):
                upto = bisect_right(vals, bound)
                counts[i] += upto - below
                below = upto
            counts[-1] += len(vals) - below
        total[0] += s

    def count(self, **labels: Any) -> int:
        s = self.series.get(_key(labels))
        return sum(s[0]) if s else 0

    def sum(self, **labels: Any) -> float:
        s = self.series.get(_key(labels))
        return s[1][0] if s else 0.0

    get = count

    def total(self) -> float:
        return sum(sum(counts) for counts, _ in self.series.values())

    def family(self, full: str) -> Family:
        fam = Family(full, self.help, "histogram")
        series = self.series or {(): ([0] * (len(self.buckets) + 1), [0.0])}
        for key, (counts, total) in series.items():
            labels = dict(key)
            cumulative = 0
            for bound, n in zip((*self.buckets, float("inf")), counts, strict=True):
                cumulative += n
                fam.add_sample(f"{full}_bucket", {**labels, "le": floatToGoString(bound)},
                               cumulative)
            fam.add_sample(f"{full}_count", labels, cumulative)
            fam.add_sample(f"{full}_sum", labels, total[0])
        return fam


class _Exporter:
    """The ``prometheus_client`` collector that reads a ``Metrics``."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Family]:
        m = self.metrics
        m.collect()
        info = Family(f"{m.prefix}_build_info",
                      "edgegw version, Python and STDF record loop, always 1", "gauge")
        info.add_sample(f"{m.prefix}_build_info", BUILD_INFO, 1)
        yield info
        for metric in list(m._metrics.values()):
            yield metric.family(f"{m.prefix}_{metric.name}")


def _build_info() -> dict[str, str]:
    try:
        version = metadata.version("edgegw")
    except metadata.PackageNotFoundError:  # run from a source tree, not installed
        version = "unknown"
    return {"version": version, "python": platform.python_version(),
            "stdf_loop": _stdf_loop()}


def _stdf_loop() -> str:
    """Which STDF record loop this process decodes with (docs/stdf.md): ``compiled`` where
    the optional C loop was built and not turned off by EDGEGW_STDF_ACCEL=0, else
    ``python``.  Found without importing the decoder (a service that reads no STDF)."""
    from importlib.util import find_spec

    if os.environ.get("EDGEGW_STDF_ACCEL", "1") == "0":
        return "python"
    try:
        return "compiled" if find_spec("edgegw.stdf._accel") is not None else "python"
    except ImportError:
        return "python"


BUILD_INFO = _build_info()


class Metrics:
    """A registry.  ``counter``/``gauge``/``histogram`` return the existing metric when
    called again with the same name; counters must end in ``_total``."""

    def __init__(self, prefix: str = "edgegw") -> None:
        self.prefix = prefix
        self._metrics: dict[str, Metric | Histogram] = {}
        self._collectors: list[Callable[[], None]] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Exporter(self))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def _get(self, name: str, help: str, kind: str) -> Metric:
        metric = self._metrics.get(name)
        if metric is None:
            metric = self._metrics[name] = Metric(name, help, kind)
        if not isinstance(metric, Metric) or metric.kind != kind:
            raise ValueError(f"metric {name!r} is a {metric.kind}, not a {kind}")
        return metric

    def counter(self, name: str, help: str = "") -> Metric:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r}: a counter's name ends in _total")
        return self._get(name, help, "counter")

    def gauge(self, name: str, help: str = "") -> Metric:
        if name.endswith("_total"):
            raise ValueError(f"gauge {name!r}: _total is for counters")
        return self._get(name, help, "gauge")

    def histogram(self, name: str, help: str = "",
                  buckets: Iterable[float] = LATENCY_BUCKETS) -> Histogram:
        metric = self._metrics.get(name)
        if metric is None:
            metric = self._metrics[name] = Histogram(name, help, buckets)
        if not isinstance(metric, Histogram):
            raise ValueError(f"metric {name!r} is a {metric.kind}, not a histogram")
        return metric

    def carry_on(self, previous: Metrics) -> None:
        """Counters and histograms go on from ``previous``'s counts (a service made again
        inside the same process -- a gateway's SIGHUP reload -- counts since the process
        started, as its ``/metrics`` page says by ``process_start_time_seconds``).
        Gauges are not carried: they say how things are now, which the new one sets."""
        for old in previous._metrics.values():
            if isinstance(old, Histogram):
                new_h = self.histogram(old.name, old.help, old.buckets)
                if new_h.buckets != old.buckets:
                    continue  # other bounds: the counts would not mean the same
                for key, (counts, total) in old.series.items():
                    mine = new_h.series.setdefault(key, ([0] * len(counts), [0.0]))
                    for i, n in enumerate(counts):
                        mine[0][i] += n
                    mine[1][0] += total[0]
            elif old.kind == "counter":
                new_c = self.counter(old.name, old.help)
                for key, value in old.values.items():
                    new_c.values[key] = new_c.values.get(key, 0) + value

    def add_collector(self, fn: Callable[[], None]) -> None:
        """``fn`` refreshes gauges just before they are read."""
        self._collectors.append(fn)

    def collect(self) -> None:
        for fn in self._collectors:
            fn()

    def as_dict(self) -> dict[str, Any]:
        self.collect()
        out: dict[str, Any] = {}
        for m in self._metrics.values():
            values: dict[LabelKey, Any]
            if isinstance(m, Histogram):
                values = {k: {"count": sum(c), "sum": s[0]} for k, (c, s) in m.series.items()}
            else:
                values = m.values
            if len(values) == 1 and () in values:
                out[m.name] = values[()]
            else:
                out[m.name] = {
                    ",".join(f"{k}={v}" for k, v in key) or "": val
                    for key, val in values.items()
                }
        return out

    def render_prometheus(self) -> str:
        return generate_latest(self.registry).decode()


#: ``edgegw_internal_errors_total{where=...}``: unexpected exceptions caught at a failure
#: boundary (docs/reliability.md).  Invalid input is never counted here -- only bugs and
#: environment failures that a boundary kept from spreading.
INTERNAL_ERRORS = "internal_errors_total"
_INTERNAL_ERRORS_HELP = "unexpected exceptions caught at a failure boundary, by where"

# Per ``where``: when its traceback was last logged, and how many were not logged since.
_LOG_EVERY_S = 10.0
_last_logged: dict[str, tuple[float, int]] = {}


def internal_errors(metrics: Metrics) -> Metric:
    """The shared internal-error counter of ``metrics``."""
    return metrics.counter(INTERNAL_ERRORS, _INTERNAL_ERRORS_HELP)


def report_internal_error(metrics: Metrics, where: str, logger: logging.Logger, context: str,
                          *args: Any) -> None:
    """Count and log the exception being handled at the failure boundary ``where``.

    Call it from the ``except`` block that ends the unit (a connection, a message, a
    delivery, a source run).  Every occurrence is counted; the traceback is logged with
    ``context`` at most once per 10 s per ``where`` (a bug hit by every message must not
    flood the log), the next log line saying how many were not logged in between."""
    internal_errors(metrics).inc(where=where)
    now = time.monotonic()
    last, suppressed = _last_logged.get(where, (-_LOG_EVERY_S, 0))
    if now - last < _LOG_EVERY_S:
        _last_logged[where] = (last, suppressed + 1)
        return
    _last_logged[where] = (now, 0)
    more = f" ({suppressed} more at {where} not logged since)" if suppressed else ""
    logger.error("internal error at %s: " + context + "%s", where, *args, more,
                 exc_info=sys.exc_info()[0] is not None)


__all__ = [
    "AGE_BUCKETS", "BUILD_INFO", "INTERNAL_ERRORS", "LATENCY_BUCKETS", "Histogram", "LabelKey",
    "Metric", "Metrics", "internal_errors", "report_internal_error",
]
