"""The webhook outbox: at-least-once delivery across a restart of the hub and a takeover of
the cluster's alert feed (docs/alerts.md, "Delivery across a restart or a takeover").

Every (webhook, event) gets a row in the durable store (the hub's ``history.sqlite3``,
PostgreSQL in a cluster) *before* it is sent, and an outcome once the sender is finished
with it (``WebhookSender(on_outcome=...)``: delivered, refused, given up after
``max_attempts``, dropped from a full queue).  The next hub to start, or the next holder of
the ``alerts`` lease, sends again every row without an outcome that is younger than its
webhook's ``max_age_s`` (older ones are marked ``expired`` and counted); the POST's
``X-Edgegw-Event-Id`` is the same each time, so a receiver drops the copy it got already.

Outcomes are written in batches by ``run`` (a store write per delivery would be a
transaction per POST); a mark lost in a crash means one more resend, never one fewer.

When the single hub's store cannot be written (a full disk, a lock held by another
process), the rows it could not take are **held** in memory (``hold``): their
events are sent and retried all the same, and ``run`` writes the rows, then their outcomes,
as soon as the store takes writes again -- from then on a restart resends them like any
other row.  Only a hub that stops before that loses them (logged with their keys at close).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from edgegw.jsonutil import dumps
from edgegw.metrics import Metrics

from .webhooks import WebhookSender, event_key, shown_url

log = logging.getLogger("edgegw.hub.webhooks")

#: finished rows are kept this long (a re-announced event finds its row: not sent twice)
KEEP_FINISHED_S = 86_400.0
#: a failed write of rows or outcomes is tried again after this long, doubling to
#: ``RETRY_MAX_S`` while it fails (a store held locked makes each try wait 5 s on its lock,
#: in the one thread every history read waits for too)
RETRY_S = 1.0
RETRY_MAX_S = 16.0
#: rows held in memory at most (the store could not be written); beyond, the oldest finished
#: ones are forgotten first: unwritten, a finished row only keeps an event raised again by
#: a replay from being sent a second time.  Unfinished ones are bounded by the sender's
#: queues (an event dropped from a full queue is finished).
MAX_HELD_ROWS = 10_000

Row = tuple[str, str, str, float]  # url, event key, payload JSON, queued at (wall clock)


class OutboxStore(Protocol):
    async def undelivered_webhooks(self) -> list[Row]: ...

    async def queue_webhooks(self, rows: list[Row]) -> set[tuple[str, str]]: ...

    async def mark_webhooks(self, marks: list[tuple[str, str, str]],
                            prune_before: float | None = None) -> None: ...


def outbox_rows(sender: WebhookSender, events: Iterable[dict[str, Any]],
                now: float) -> list[Row]:
    """The rows of ``events``: one per webhook that wants each."""
    return [(url, event_key(e), dumps(e), now) for e in events for url in sender.targets(e)]


@dataclass
class _Held:
    """A row the store could not take, waiting in memory to be written."""

    payload: str
    queued_at: float
    finished: bool = False


class WebhookOutbox:
    """Records the sender's outcomes in ``store`` (``record`` is its ``on_outcome``), at
    start hands it what is left to send (``resend``), and keeps the rows the store could
    not take until it can (``hold``)."""

    def __init__(self, store: OutboxStore, *, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock
        self._marks: list[tuple[str, str, str]] = []
        self._held: OrderedDict[tuple[str, str], _Held] = OrderedDict()  # oldest first
        self._unfinished = 0  # of the rows held
        self._wake = trio.Event()
        metrics = metrics or Metrics()
        self.m_resent = metrics.counter(
            "hub_webhook_resent_total",
            "alert events queued again for a webhook after a restart or a feed takeover")
        self.m_failed = metrics.counter("hub_webhook_failed_total",
                                        "alert events a webhook never accepted, by reason")
        self.m_held = metrics.gauge(
            "hub_webhook_unrecorded_pending",
            "alert events for a webhook whose outbox row is only in memory (the history "
            "store could not be written) and not yet finished: lost if the hub stops now")
        self.m_held.set(0)
        # (the alert service's counter: one failed write of the history store, whoever)
        self.m_store_errors = metrics.counter("hub_history_store_errors_total",
                                              "history store writes that failed")
        self.last_error: str | None = None  # of the last write that failed

    @property
    def held_rows(self) -> int:
        """Rows only in memory: the store could not take them yet."""
        return len(self._held)

    def hold(self, rows: Iterable[Row]) -> set[tuple[str, str]]:
        """Keep ``rows`` the store could not take; ``run`` writes them when it can.
        Returns the ``(url, key)`` held now (one held already is not queued again)."""
        new = set()
        for url, key, payload, at in rows:
            if (url, key) not in self._held:
                self._held[(url, key)] = _Held(payload, at)
                self._unfinished += 1
                new.add((url, key))
        while len(self._held) > MAX_HELD_ROWS:
            self._forget_one()
        self.m_held.set(self._unfinished)
        if new:
            self._wake.set()
        return new

    def held_unfinished(self) -> list[tuple[str, str]]:
        """The ``(url, key)`` of the rows held, not yet written, whose event is not finished
        with, oldest first: a hub stopping now would not send them again."""
        return [k for k, h in self._held.items() if not h.finished]

    def _forget_one(self) -> None:
        victim = next((k for k, h in self._held.items() if h.finished), None)
        if victim is None:  # all unfinished (more webhooks than MAX_HELD_ROWS / max_queued)
            victim = next(iter(self._held))
            log.error("webhook %s: alert event %s: its outbox row is dropped from memory "
                      "(%d held, the history store cannot be written): not sent again if "
                      "the hub stops before it is delivered", shown_url(victim[0]), victim[1],
                      MAX_HELD_ROWS)
        self._drop(victim)

    def _drop(self, key: tuple[str, str]) -> None:
        held = self._held.pop(key, None)
        if held is not None and not held.finished:
            self._unfinished -= 1

    def record(self, url: str, event: dict[str, Any], outcome: str) -> None:
        """``WebhookSender(on_outcome=...)``."""
        key = event_key(event)
        self._marks.append((url, key, outcome))
        held = self._held.get((url, key))
        if held is not None and not held.finished:  # its outcome is written after the row
            held.finished = True
            self._unfinished -= 1
            self.m_held.set(self._unfinished)
        self._wake.set()

    async def resend(self, sender: WebhookSender) -> int:
        """Queue on ``sender`` every unfinished row young enough; returns how many."""
        rows = await self.store.undelivered_webhooks()
        configs = sender.configs()
        now = self._clock()
        queued = 0
        for url, key, payload, at in rows:
            config = configs.get(url)
            if config is None:  # the webhook left the configuration: nobody to send to
                self._marks.append((url, key, "unconfigured"))
            elif now - at > config.max_age_s:
                log.warning("webhook %s: alert event %s not sent again: queued %.0f s ago "
                            "(max_age_s %.0f)", shown_url(url), key, now - at, config.max_age_s)
                self.m_failed.inc(url=shown_url(url), reason="expired")
                self._marks.append((url, key, "expired"))
            else:
                sender.submit(json.loads(payload), urls=(url,))
                self.m_resent.inc(url=shown_url(url))
                queued += 1
        if self._marks:
            self._wake.set()
        if queued:
            log.info("webhooks: %d alert event(s) not delivered before are sent again", queued)
        return queued

    async def flush(self) -> None:
        """Write the rows held so far, then the outcomes recorded so far (raises what the
        store raises; kept then)."""
        if self._held:
            rows = [(url, key, h.payload, h.queued_at)
                    for (url, key), h in self._held.items()]
            await self.store.queue_webhooks(rows)  # a row there already is kept as it is
            for url, key, _, _ in rows:
                self._drop((url, key))
            self.m_held.set(self._unfinished)
            log.info("webhooks: %d outbox row(s) kept in memory while the history store "
                     "could not be written are written now", len(rows))
        marks, self._marks = self._marks, []
        if not marks:
            return
        try:
            await self.store.mark_webhooks(marks, prune_before=self._clock() - KEEP_FINISHED_S)
        except BaseException:
            self._marks[:0] = marks
            raise

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        retry_s = RETRY_S
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            try:
                await self.flush()
            except Exception as exc:  # store away: rows and marks wait (resent at worst)
                self.m_store_errors.inc()  # each retry that fails is a failed write too
                self.last_error = str(exc)
                log.warning("webhook outbox rows (%d) and outcomes (%d) not written (tried "
                            "again in %.0f s): %s", len(self._held), len(self._marks),
                            retry_s, exc)
                await trio.sleep(retry_s)
                retry_s = min(retry_s * 2, RETRY_MAX_S)
                self._wake.set()
            else:
                retry_s = RETRY_S


__all__ = ["KEEP_FINISHED_S", "MAX_HELD_ROWS", "OutboxStore", "WebhookOutbox", "outbox_rows"]
