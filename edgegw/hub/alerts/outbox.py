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
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import trio

from edgegw.jsonutil import dumps
from edgegw.metrics import Metrics

from .webhooks import WebhookSender, event_key

log = logging.getLogger("edgegw.hub.webhooks")

#: finished rows are kept this long (a re-announced event finds its row: not sent twice)
KEEP_FINISHED_S = 86_400.0
#: a failed outcome write is tried again after this long
RETRY_S = 1.0

Row = tuple[str, str, str, float]  # url, event key, payload JSON, queued at (wall clock)


class OutboxStore(Protocol):
    async def undelivered_webhooks(self) -> list[Row]: ...

    async def mark_webhooks(self, marks: list[tuple[str, str, str]],
                            prune_before: float | None = None) -> None: ...


def outbox_rows(sender: WebhookSender, events: Iterable[dict[str, Any]],
                now: float) -> list[Row]:
    """The rows of ``events``: one per webhook that wants each."""
    return [(url, event_key(e), dumps(e), now) for e in events for url in sender.targets(e)]


class WebhookOutbox:
    """Records the sender's outcomes in ``store`` (``record`` is its ``on_outcome``) and,
    at start, hands it what is left to send (``resend``)."""

    def __init__(self, store: OutboxStore, *, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock
        self._marks: list[tuple[str, str, str]] = []
        self._wake = trio.Event()
        metrics = metrics or Metrics()
        self.m_resent = metrics.counter(
            "hub_webhook_resent_total",
            "alert events queued again for a webhook after a restart or a feed takeover")
        self.m_failed = metrics.counter("hub_webhook_failed_total",
                                        "alert events a webhook never accepted, by reason")

    def record(self, url: str, event: dict[str, Any], outcome: str) -> None:
        """``WebhookSender(on_outcome=...)``."""
        self._marks.append((url, event_key(event), outcome))
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
                            "(max_age_s %.0f)", url, key, now - at, config.max_age_s)
                self.m_failed.inc(url=url, reason="expired")
                self._marks.append((url, key, "expired"))
            else:
                sender.submit(json.loads(payload), urls=(url,))
                self.m_resent.inc(url=url)
                queued += 1
        if self._marks:
            self._wake.set()
        if queued:
            log.info("webhooks: %d alert event(s) not delivered before are sent again", queued)
        return queued

    async def flush(self) -> None:
        """Write the outcomes recorded so far (raises what the store raises; kept then)."""
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
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            try:
                await self.flush()
            except Exception as exc:  # store away: the marks wait (resent at worst)
                log.warning("webhook outcomes not written (%d): %s", len(self._marks), exc)
                await trio.sleep(RETRY_S)
                self._wake.set()


__all__ = ["KEEP_FINISHED_S", "OutboxStore", "WebhookOutbox", "outbox_rows"]
