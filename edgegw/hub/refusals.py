"""The gateway ids the hub refused, counted in bounded memory (``Ingest.refused``).

A refused HELLO names any gateway id its sender likes (up to 128 characters): a scan of
made-up ids must not grow the hub's memory, nor its ``/api/stats`` answer, without bound.
What an operator needs stays:

* every **configured** gateway's refusals (a wrong token, a certificate not its own, a
  protocol version this hub does not speak), counted exactly: there are as many as the
  config lists, and a stranger cannot add one;
* of the **other** ids (a typo in a gateway's config, a scan), at most ``limit``: a new id
  always gets in, in place of the least refused one (the one that reached its count
  longest ago among equals), so an id retrying keeps its place while a scan of ids seen
  once each only replaces its own ids;
* the **total**, exact, and how many of the refusals counted under ids no longer listed
  (``summary``): the listed counts plus ``unlisted`` are the total.

Sans-IO; each ``add`` is O(1) (the least-frequently-used scheme: ids grouped by count).

``RefusalLog`` decides which refused HELLOs are logged, so that a gateway retrying forever
with a wrong token (or a scan) cannot fill the log: the first of each (remote address,
gateway id, reason) at WARNING, then at most one summary line a minute for it, saying how
many were refused since its last line (the metrics count every one).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

#: ids not in the config whose refusals are listed (``/api/stats`` "gateways")
MAX_REFUSED_IDS = 100


class RefusedIds:
    """Refused HELLOs per gateway id: ``add`` one, ``get`` an id's count, iterate over the
    ids listed, ``summary`` for ``/api/stats`` (see the module docstring)."""

    def __init__(self, limit: int = MAX_REFUSED_IDS, *,
                 configured: Callable[[str], bool] | None = None) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.total = 0  # every refusal counted, exact
        self.unlisted = 0  # refusals of the ids dropped from the list
        self._configured = configured
        self._known: dict[str, int] = {}  # configured ids
        self._counts: dict[str, int] = {}  # other ids, at most ``limit``
        # the other ids by count, each group in the order its ids reached that count
        self._by_count: dict[int, dict[str, None]] = {}
        self._min = 0  # the smallest count in ``_by_count``

    def add(self, gateway_id: str) -> None:
        """Count one refused HELLO of ``gateway_id``."""
        self.total += 1
        if self._configured is not None and self._configured(gateway_id):
            self._known[gateway_id] = self._known.get(gateway_id, 0) + 1
            return
        counts, by_count = self._counts, self._by_count
        n = counts.get(gateway_id)
        if n is None:
            if len(counts) >= self.limit:  # make room: the least refused, oldest first
                group = by_count[self._min]
                victim = next(iter(group))
                del group[victim]
                if not group:
                    del by_count[self._min]
                self.unlisted += counts.pop(victim)
            counts[gateway_id] = 1
            by_count.setdefault(1, {})[gateway_id] = None
            self._min = 1
            return
        group = by_count[n]
        del group[gateway_id]
        if not group:
            del by_count[n]
            if self._min == n:
                self._min = n + 1
        counts[gateway_id] = n + 1
        by_count.setdefault(n + 1, {})[gateway_id] = None

    def get(self, gateway_id: str, default: int = 0) -> int:
        """The refusals counted for ``gateway_id``; ``default`` when it is not listed."""
        n = self._known.get(gateway_id)
        return n if n is not None else self._counts.get(gateway_id, default)

    def __iter__(self) -> Iterator[str]:
        """The ids listed: every configured one refused, then the others kept."""
        yield from self._known
        yield from self._counts

    def __len__(self) -> int:
        return len(self._known) + len(self._counts)

    def summary(self) -> dict[str, int]:
        """``/api/stats`` "refused": the ``total``, the ``ids`` listed, and the refusals of
        ids no longer listed (``unlisted``)."""
        return {"total": self.total, "ids": len(self), "unlisted": self.unlisted}


#: seconds between two log lines of one (address, gateway id, reason)
REFUSAL_LOG_INTERVAL_S = 60.0
#: (address, gateway id, reason) remembered for the log limit (the least recently refused
#: is forgotten first: its next refusal is logged as a first one)
REFUSAL_LOG_KEYS = 1000
#: first lines of new (address, gateway id, reason) per interval, all keys together (a scan
#: of made-up ids from many addresses); the ones over it go into one summary line
REFUSAL_LOG_NEW_PER_INTERVAL = 20


@dataclass
class LogLine:
    """What to log for a refusal (``RefusalLog.note``): ``first`` (the first refusal of its
    key), or a summary: ``count`` refusals of its key since its last line, this one
    included, over ``seconds``."""

    first: bool
    count: int = 1
    seconds: float = 0.0


@dataclass
class _Logged:
    at: float  # when its last line was logged
    unlogged: int = 0  # refusals since that line, not logged
    remote: str = ""  # the address and reason of the last refusal, for a summary line
    reason: str = ""


class RefusalLog:
    """Which refused HELLOs to log (see the module docstring); sans-IO, ``now`` a monotonic
    clock in seconds.  Every refusal goes through ``note``; a summary is due when a
    refusal of its key comes at least ``interval_s`` after the key's last line, or (``due``,
    which the hub calls about once a second) when that much time has passed with refusals
    not logged: a gateway that stopped retrying still gets its last line."""

    def __init__(self, interval_s: float = REFUSAL_LOG_INTERVAL_S,
                 max_keys: int = REFUSAL_LOG_KEYS,
                 new_per_interval: int = REFUSAL_LOG_NEW_PER_INTERVAL) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self.new_per_interval = new_per_interval
        self._keys: OrderedDict[Hashable, _Logged] = OrderedDict()
        self._window = -interval_s  # start of the current interval of first lines
        self._new = 0  # first lines logged in the current interval
        self._others = 0  # refusals of new keys over the budget, not logged yet
        self._others_at = -interval_s  # when the last line about them was logged
        self._unlogged = 0  # refusals of known keys waiting for a summary (``due``)

    def note(self, key: Hashable, now: float) -> LogLine | None:
        """One refusal of ``key``: what to log for it, or None (counted for a summary)."""
        entry = self._keys.get(key)
        if entry is not None:
            self._keys.move_to_end(key)
            entry.unlogged += 1
            if now - entry.at < self.interval_s:
                self._unlogged += 1
                return None
            self._unlogged -= entry.unlogged - 1
            line = LogLine(False, entry.unlogged, now - entry.at)
            entry.at, entry.unlogged = now, 0
            return line
        if now - self._window >= self.interval_s:
            self._window, self._new = now, 0
        if self._new >= self.new_per_interval:
            self._others += 1
            return None
        self._new += 1
        self._keys[key] = _Logged(now)
        if len(self._keys) > self.max_keys:
            _, forgotten = self._keys.popitem(last=False)
            self._unlogged -= forgotten.unlogged
        return LogLine(True)

    def due(self, now: float) -> list[tuple[Hashable, LogLine, str, str]]:
        """The summaries due although no new refusal came: ``(key, line, remote, reason)``
        for each key with refusals not logged whose last line is ``interval_s`` old."""
        if not self._unlogged:
            return []
        out = []
        for key, entry in self._keys.items():
            if entry.unlogged and now - entry.at >= self.interval_s:
                out.append((key, LogLine(False, entry.unlogged, now - entry.at),
                            entry.remote, entry.reason))
                self._unlogged -= entry.unlogged
                entry.at, entry.unlogged = now, 0
        return out

    def log(self, logger: logging.Logger, gateway_id: str, remote: str, kind: str,
            reason: str, now: float) -> None:
        """Log one refused HELLO of ``gateway_id`` from ``remote`` (``kind``: the reason's
        metric label, ``reason``: what the gateway was told), as ``note`` decides."""
        key = (address_of(remote), gateway_id, kind)
        line = self.note(key, now)
        entry = self._keys.get(key)
        if entry is not None:
            entry.remote, entry.reason = address_of(remote), reason
        if line is not None and line.first:
            logger.warning("refused gateway %r from %s: %s (further refusals of it from "
                           "this address: at most one line a minute)", gateway_id, remote,
                           reason)
        elif line is not None:
            logger.warning("refused gateway %r from %s %d times in the last %.0f s: %s",
                           gateway_id, address_of(remote), line.count, line.seconds, reason)
        self._log_others(logger, now)

    def log_due(self, logger: logging.Logger, now: float) -> None:
        """Log the summaries ``due`` now, with no new refusal to carry them."""
        for key, line, remote, reason in self.due(now):
            gateway_id = key[1] if isinstance(key, tuple) else key
            logger.warning("refused gateway %r from %s %d times in the last %.0f s: %s",
                           gateway_id, remote, line.count, line.seconds, reason)
        self._log_others(logger, now)

    def _log_others(self, logger: logging.Logger, now: float) -> None:
        others = self.others_due(now)
        if others:
            logger.warning("refused %d more HELLOs (other addresses, gateway ids or reasons; "
                           "not logged one by one, counted in hub_refused_total)", others)

    def others_due(self, now: float) -> int:
        """The refusals of new keys not logged (over ``new_per_interval``) since the last
        line about them, when such a line is due (at most one per interval), else 0."""
        if not self._others or now - self._others_at < self.interval_s:
            return 0
        n, self._others, self._others_at = self._others, 0, now
        return n


def address_of(remote: str) -> str:
    """The address of a ``host:port`` remote (a gateway reconnects from a new port)."""
    return remote.rpartition(":")[0] or remote


__all__ = ["MAX_REFUSED_IDS", "LogLine", "RefusalLog", "RefusedIds", "address_of"]
