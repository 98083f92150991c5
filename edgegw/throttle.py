"""Throttle / downsample fast value streams to a UI rate (sans-IO).

Sensors publish far faster than a person can read (1 kHz is common); forwarding every
reading would flood the uplink and the dashboards.  Instead, per channel, every reading
is folded into the channel's open *window*, and once per interval each channel that saw
readings emits one window: last, min, max, mean and count over ``[t0, t1)``.  Individual
readings are not forwarded, but nothing is lost from the statistics: every ``add`` lands
in exactly one emitted window, so the counts of the windows add up exactly to the number
of readings (``flush`` emits what is still open at shutdown).

Time is whatever clock the caller passes to ``poll(now)``: windows are aligned to
multiples of ``interval`` in that clock, so all channels of one throttle close together
(and their windows travel in one batch).  The rule that makes the bucketing exact without
a clock in ``add``: ``poll(now)`` closes every window that ended by ``now``; readings
added after it belong to the window containing ``now``.  A driver therefore calls
``poll(time())`` before adding a burst of readings that arrived at ``time()``, and again at
``deadline`` when nothing arrives.  A clock that steps back (a wall clock: NTP) does not
hold windows open for the length of the step: the open ones close as due and the grid starts
again; a step forward closes one longer window.

Values in, windows out: no record types here, so the hub reuses it for dashboard clients;
``as_sensor_window`` is the thin adapter to the gateway's ``SensorWindow`` record.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .records import SensorWindow


class Window(NamedTuple):
    """The statistics of every reading of ``channel`` added in ``[t0, t1)``."""

    channel: str
    last: float
    min: float
    max: float
    mean: float
    count: int  # type: ignore[assignment]  # (tuple.count: shadowed)
    t0: float
    t1: float
    last_ts: float  # the timestamp the caller gave with the last reading


class _Accumulator:
    __slots__ = ("count", "last", "last_ts", "max", "min", "total")

    def __init__(self, value: float, ts: float) -> None:
        self.count = 1
        self.last = self.min = self.max = self.total = value
        self.last_ts = ts

    def add(self, value: float, ts: float) -> None:
        self.count += 1
        self.last = value
        self.last_ts = ts
        self.total += value
        if value < self.min:
            self.min = value
        elif value > self.max:
            self.max = value


class Throttle:
    """One UI rate for any number of channels.  Use one throttle per distinct rate."""

    def __init__(self, interval: float) -> None:
        if not interval > 0 or not math.isfinite(interval):
            raise ValueError(f"throttle interval must be a positive number, got {interval!r}")
        self.interval = interval
        self._open: dict[str, _Accumulator] = {}
        self._t0: float | None = None  # start of the open windows, on the interval grid
        self.readings = 0  # readings added, ever
        self.emitted = 0  # readings emitted in windows, ever (== readings after flush)

    def _floor(self, now: float) -> float:
        # The tolerance keeps a time that is a boundary in decimal (10.1 at 0.1 s) on it
        # although 10.1 / 0.1 is 100.99999999999999 in binary floating point.
        return math.floor(now / self.interval + 1e-9) * self.interval

    def add(self, channel: str, value: float, ts: float) -> None:
        acc = self._open.get(channel)
        if acc is None:
            self._open[channel] = _Accumulator(value, ts)
        else:
            acc.add(value, ts)
        self.readings += 1

    @property
    def pending(self) -> int:
        """Readings added but not yet emitted."""
        return self.readings - self.emitted

    @property
    def deadline(self) -> float | None:
        """When ``poll`` next has a window to emit, or None while nothing is open."""
        if not self._open:
            return None
        if self._t0 is None:  # readings before the first poll: emit at the next poll
            return -math.inf
        return self._t0 + self.interval

    def poll(self, now: float) -> list[Window]:
        """Close and return every window that ended by ``now``."""
        if self._t0 is None:
            self._t0 = self._floor(now)
            if not self._open:
                return []
            # Readings added before the clock was first seen: their window ends now.
            return self._close(self._t0, now)
        t1 = self._floor(now)
        if t1 < self._t0:
            # The clock stepped back past the open windows' start (a wall clock set back by
            # NTP or by hand): waiting for it to reach their end again would hold them for as
            # long as the step.  They close as due (ending one interval after their start)
            # and the grid starts again at ``now``.
            out = self._close(self._t0, self._t0 + self.interval) if self._open else []
            self._t0 = t1
            return out
        if t1 == self._t0:
            return []
        out = self._close(self._t0, t1) if self._open else []
        self._t0 = t1
        return out

    def flush(self, now: float | None = None) -> list[Window]:
        """Emit every open window now (at shutdown); ``t1`` is ``now`` or the window's end."""
        if not self._open:
            return []
        t0 = self._t0 if self._t0 is not None else (now if now is not None else 0.0)
        t1 = now if now is not None else t0 + self.interval
        out = self._close(t0, max(t0, t1))
        if now is not None:
            self._t0 = self._floor(now)
        return out

    def _close(self, t0: float, t1: float) -> list[Window]:
        out = [
            Window(ch, a.last, a.min, a.max, a.total / a.count, a.count, t0, t1, a.last_ts)
            for ch, a in self._open.items()
        ]
        self._open = {}
        self.emitted += sum(w.count for w in out)
        return out


def as_sensor_window(window: Window, source: str, unit: str = "") -> SensorWindow:
    """The gateway record for a window; its ``ts`` is the window's end."""
    return SensorWindow(source, window.t1, window.channel, window.last, window.min,
                        window.max, window.mean, window.count, window.t0, window.t1, unit)


__all__ = ["Throttle", "Window", "as_sensor_window"]
