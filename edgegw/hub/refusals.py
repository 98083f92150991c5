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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

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


__all__ = ["MAX_REFUSED_IDS", "RefusedIds"]
