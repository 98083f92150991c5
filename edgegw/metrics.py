"""Counters and gauges, rendered as Prometheus text and as JSON.

Deliberately tiny: one process, one registry, labels as keyword arguments.  Every bad
input the service survives is counted here, so health never stays green while data is
being thrown away.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

LabelKey = tuple[tuple[str, str], ...]


class Metric:
    def __init__(self, name: str, help: str, kind: str) -> None:
        self.name = name
        self.help = help
        self.kind = kind
        self.values: dict[LabelKey, float] = {}

    @staticmethod
    def _key(labels: dict[str, Any]) -> LabelKey:
        return tuple(sorted((k, str(v)) for k, v in labels.items()))

    def inc(self, amount: float = 1, **labels: Any) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0) + amount

    def set(self, value: float, **labels: Any) -> None:
        self.values[self._key(labels)] = value

    def get(self, **labels: Any) -> float:
        return self.values.get(self._key(labels), 0)

    def total(self) -> float:
        return sum(self.values.values())


class Metrics:
    """A registry.  ``counter``/``gauge`` return the existing metric when called again."""

    def __init__(self, prefix: str = "edgegw") -> None:
        self.prefix = prefix
        self._metrics: dict[str, Metric] = {}
        self._collectors: list[Callable[[], None]] = []

    def _get(self, name: str, help: str, kind: str) -> Metric:
        metric = self._metrics.get(name)
        if metric is None:
            metric = self._metrics[name] = Metric(name, help, kind)
        return metric

    def counter(self, name: str, help: str = "") -> Metric:
        return self._get(name, help, "counter")

    def gauge(self, name: str, help: str = "") -> Metric:
        return self._get(name, help, "gauge")

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
            if len(m.values) == 1 and () in m.values:
                out[m.name] = m.values[()]
            else:
                out[m.name] = {
                    ",".join(f"{k}={v}" for k, v in key) or "": val
                    for key, val in m.values.items()
                }
        return out

    def render_prometheus(self) -> str:
        self.collect()
        lines: list[str] = []
        for m in self._metrics.values():
            full = f"{self.prefix}_{m.name}"
            lines.append(f"# HELP {full} {m.help}")
            lines.append(f"# TYPE {full} {m.kind}")
            for key, val in m.values.items():
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
                lines.append(f"{full}{{{labels}}} {val:g}" if labels else f"{full} {val:g}")
        return "\n".join(lines) + "\n"


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


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


__all__ = [
    "INTERNAL_ERRORS", "LabelKey", "Metric", "Metrics", "internal_errors", "report_internal_error"
]
