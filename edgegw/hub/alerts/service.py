"""The Trio side of alerts: persistence, webhook delivery and the clock.

The engine (``edgegw.hub.alerts``) is sans-IO and called synchronously from the live state
in the Trio thread; it hands each event to ``AlertService`` through a memory channel
(``send_nowait``: the caller never blocks).  ``run`` drains the channel, writes each
event's alert to the history store, with a webhook outbox row per webhook that wants it
(same transaction), and only then queues it for the webhooks -- a webhook never announces
an alert the hub could forget in a crash, and an event not delivered when the hub stopped
or died is sent again when it starts (``outbox``: at least once).  When the store cannot be
written the events are sent all the same and their outbox rows held in memory until it can
(``WebhookOutbox.hold``); so are the alerts' states (an acknowledgement above all: no
replay of the frames brings one back), written back at the first try the store takes
(``_held``).  Evicted lots' and wafers' archives travel the same way and are held too
(``_held_archives``), bounded: they can be large (docs/alerts.md).

Wiring, in this order (the engine must know the persisted alerts before the hub replays
its frames, or replay would raise them again)::

    alerts = AlertService(config.alerts, publish, data_dir / "history.sqlite3")
    await alerts.open()
    state = LiveState(publish, alerts=alerts.engine, on_evict=alerts.archive_lot,
                      on_wafer_archive=alerts.archive_wafer)
    hub.add_consumer(state)
    await nursery.start(alerts.run, state)   # ticks state.tick(now) once a second
    await nursery.start(hub.run)             # replays, then serves
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from edgegw.hub.archive_merge import archive_order
from edgegw.hub.history_store import HistoryStore
from edgegw.jsonutil import dumps
from edgegw.metrics import Metrics, report_internal_error

from .config import AlertsConfig
from .engine import AlertEngine, RuleChanges
from .outbox import RETRY_MAX_S, RETRY_S, WebhookOutbox, outbox_rows
from .webhooks import WebhookSender, event_key, shown_url

if TYPE_CHECKING:
    from edgegw.hub.live import LiveState

log = logging.getLogger("edgegw.hub.alerts")

Publish = Callable[[str, dict[str, Any]], None]

#: alert states held in memory at most while the history store cannot be written (one
#: per alert, its latest); beyond, the oldest is forgotten (logged as an error)
MAX_HELD_ALERTS = 10_000
#: lot and wafer archives held in memory at most while the history store cannot be
#: written (one per lot or wafer and pass: the fullest), and their size as JSON; beyond
#: either, the oldest is dropped (counted in ``hub_archives_dropped_total``, logged as an
#: error).  An archive is a lot's whole figures (wafer maps, test statistics): hundreds
#: of kB to a few MB, several times that as Python objects.
MAX_HELD_ARCHIVES = 1_000
MAX_HELD_ARCHIVE_BYTES = 64 * 1024 * 1024

#: a held archive's key: ("lot", lot_id, counts_from) or ("wafer", lot_id, wafer_id,
#: counts_from) -- two passes of a lot tested again merge in the store, so both are held
_ArchiveKey = tuple[Any, ...]


class _HeldArchive:
    __slots__ = ("item", "nbytes", "parts")

    def __init__(self, item: tuple[str, Any], parts: int, nbytes: int) -> None:
        self.item = item  # ("lot", (lot_id, archive)) or ("wafer", (lot, wafer, snapshot))
        self.parts = parts
        self.nbytes = nbytes


def _archive_key(kind: str, payload: tuple[Any, ...]) -> tuple[_ArchiveKey, int]:
    """A lot's or wafer's archive: its held key and its part results (what "fuller"
    compares, as the store does)."""
    if kind == "lot":
        lot_id, archive = payload
        lot = archive["lot"]
        return ("lot", lot_id, lot.get("counts_from")), lot.get("parts") or 0
    lot_id, wafer_id, snap = payload
    return ("wafer", lot_id, wafer_id, snap.get("counts_from")), snap.get("parts") or 0


def _archive_name(key: _ArchiveKey) -> str:
    return f"lot {key[1]}" if key[0] == "lot" else f"wafer {key[2]} of lot {key[1]}"


def _json_sizes(items: list[tuple[str, Any]]) -> list[int]:
    """The archives' sizes as the store writes them (a worker thread: a lot's can take
    milliseconds)."""
    return [len(dumps(payload[-1])) for _, payload in items]


def reload_summary(rules: RuleChanges, webhooks: str | None) -> str:
    """What a reload of ``[alerts]`` changed, for the log (``webhooks``: None when they
    did not change)."""
    return rules.summary + (f"; webhooks: {webhooks}" if webhooks is not None else "")


class AlertService:
    def __init__(self, config: AlertsConfig, publish: Publish, path: str | Path, *,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.store = HistoryStore(path)
        self.engine = AlertEngine(config, publish, sink=self._on_event, metrics=self.metrics,
                                  elapsed=time.monotonic)
        self.outbox = WebhookOutbox(self.store, metrics=self.metrics, clock=clock)
        self.webhooks = WebhookSender(config.webhooks, metrics=self.metrics,
                                      on_outcome=self.outbox.record)
        self._clock = clock
        # Unbounded on purpose: alert events and lot evictions are rare (de-duplicated per
        # key), and dropping one would lose an acknowledgement or an alert.
        self._send, self._receive = trio.open_memory_channel[tuple[str, Any]](math.inf)
        self._m_saved = self.metrics.counter("hub_alert_events_persisted_total",
                                             "alert events written to the history store")
        self._m_store_errors = self.metrics.counter(
            "hub_history_store_errors_total", "history store writes that failed")
        self._store_error: str | None = None  # of the last write that failed
        self._m_unrecorded = self.metrics.counter(
            "hub_webhook_unrecorded_total",
            "alert events sent to a webhook before their outbox row could be written (the "
            "history store could not be written): the row is held in memory until it can")
        self._m_kept = self.metrics.counter(
            "hub_archives_kept_total",
            "lot and wafer archives not overwritten because the stored one was fuller")
        # alert id -> its latest state the store could not take, oldest first: written with
        # the next batch, or alone after ``RETRY_S`` (doubling) while nothing else comes
        self._held: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._m_held = self.metrics.gauge(
            "hub_alerts_unwritten_pending",
            "alerts whose latest state (an acknowledgement, say) is only in memory: the "
            "history store could not be written; lost if the hub stops now")
        self._m_held.set(0)
        # the lot and wafer archives the store could not take, oldest first: written with
        # the next batch (before it: a later pass merges into an earlier one) or alone
        self._held_archives: OrderedDict[_ArchiveKey, _HeldArchive] = OrderedDict()
        self._held_bytes = 0
        self._archives_given_up = 0  # not written at the stop's last try
        self._m_archives_held = self.metrics.gauge(
            "hub_archives_unwritten_pending",
            "lot and wafer archives only in memory: the history store could not be "
            "written; live-state checkpoints wait, so a restart replays and writes them")
        self._m_archives_held.set(0)
        self._m_archives_dropped = self.metrics.counter(
            "hub_archives_dropped_total",
            "lot and wafer archives lost: held in memory while the history store could not "
            "be written, then dropped over the cap")
        self._queued = 0
        self._done = 0
        self._progress = trio.Event()
        self._opened = False

    def _store_failed(self, exc: Exception) -> None:
        self._m_store_errors.inc()
        self._store_error = str(exc)

    def health_problem(self) -> str | None:
        """Why the hub's /healthz is degraded for the history store: writes failed, and
        what they were to write waits in memory (None: nothing waits)."""
        alerts, archives = len(self._held), len(self._held_archives)
        rows = self.outbox.held_rows
        if not (alerts or archives or rows):
            return None
        error = self._store_error or self.outbox.last_error
        why = f" ({error})" if error else ""
        return (f"hub.data_dir: {str(self.store.path)!r} cannot be written{why}: "
                f"{alerts} alert state(s), {archives} lot/wafer archive(s) and {rows} webhook "
                "outbox row(s) wait in memory until it can; the alert states and outbox rows "
                "are lost if the hub stops first (docs/operations.md, \"The hub's disk\")")

    async def open(self) -> int:
        """Open the history store, restore the persisted alerts into the engine and queue
        the webhook events not delivered before the stop (first in their queues); returns
        how many alerts were restored.  Call before the hub replays its frames."""
        await self.store.open()
        self._opened = True
        restored = self.engine.restore(await self.store.load_alerts(self.config.keep))
        await self.outbox.resend(self.webhooks)
        return restored

    async def aclose(self) -> None:
        if self._opened:
            self._opened = False
            self.store.stopping()  # a lock held elsewhere: a moment, not its 5 s wait
            await self._write_last()
            for alert in self._held.values():
                log.error("alert %s (%s%s) not written to the history store: after a "
                          "restart it is as stored before", alert.get("id"),
                          "acknowledged by " if alert.get("acknowledged") else "",
                          alert.get("acked_by") or alert.get("rule"))
            with trio.move_on_after(2):  # outcomes not written: those events are resent
                try:
                    await self.outbox.flush()  # the rows held in memory first
                except Exception as exc:
                    log.warning("webhook outcomes not written at close: %s", exc)
            # the one way a (webhook, event) is lost: its row never reached the store
            for url, key in self.outbox.held_unfinished():
                log.error("webhook %s: alert event %s not delivered and its outbox row not "
                          "written (history store): not sent again after a restart",
                          shown_url(url), key)
            await self.store.close()

    def _on_event(self, event: dict[str, Any]) -> None:
        self._queued += 1
        self._send.send_nowait(("alert", event))

    def archive_lot(self, lot_id: str, archive: dict[str, Any]) -> None:
        """``LiveState(on_evict=...)``: keep an evicted lot's figures for the history API."""
        self._queued += 1
        self._send.send_nowait(("lot", (lot_id, archive)))

    def archive_wafer(self, lot_id: str, wafer_id: str, snapshot: dict[str, Any]) -> None:
        """``LiveState(on_wafer_archive=...)``: keep a wafer that left memory answerable."""
        self._queued += 1
        self._send.send_nowait(("wafer", (lot_id, wafer_id, snapshot)))

    def held_lot_ids(self) -> set[str]:
        """The lots with an archive (of the lot, or of one of its wafers) held in memory."""
        return {h.item[1][0] for h in self._held_archives.values()}

    def held_archives(self, lot_id: str) -> list[tuple[str, str, str, dict[str, Any]]]:
        """``lot_id``'s archives held in memory, as ``(kind, lot_id, wafer_id, data)`` in
        the order the store would write them (``archive_order``): the history API applies
        them over the stored ones, so it answers for a lot whose archive is only here."""
        lots, wafers = self._split({k: h for k, h in self._held_archives.items()
                                    if k[1] == lot_id})
        return archive_order(lots, wafers)

    @property
    def archives_unwritten(self) -> int:
        """Archives of evicted lots and wafers not in the history store: held in memory
        (the store cannot be written), or given up at the stop.  While there are any, a
        checkpoint would stand for their eviction and a crash would lose them: the
        checkpointer writes none (``Checkpointer.checkpoint``), so the replay after a
        restart evicts the lots again and writes their archives then."""
        return len(self._held_archives) + self._archives_given_up

    @property
    def backlog(self) -> int:
        """Events and archives handed over but not yet written."""
        return self._queued - self._done

    async def wait_persisted(self) -> None:
        """Until everything handed over so far has been written (or failed to be)."""
        target = self._queued
        while self._done < target:
            await self._progress.wait()

    def reconfigure(self, config: AlertsConfig) -> str:
        """The rules, settings and webhooks of ``config`` from now on (the hub's SIGHUP):
        a line for the log.  A webhook's CA file that cannot be used raises before
        anything changes."""
        webhooks = self.webhooks.use(config.webhooks) \
            if config.webhooks != self.config.webhooks else None
        self.config = config
        return reload_summary(self.engine.reconfigure(config), webhooks)

    async def run(self, state: LiveState | None = None, *, tick_s: float = 1.0,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Persist and deliver events; call ``state.tick(now)`` (or the engine's) every
        ``tick_s`` seconds for escalation and offline gateways."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_watch)
                await nursery.start(self.outbox.run)
                await nursery.start(self.webhooks.run)
                nursery.start_soon(self._persist_loop)
                nursery.start_soon(self._tick_loop, state, tick_s)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def _stop_watch(self) -> None:
        """Tells the store the moment the hub stops: a write under way in a worker thread
        (which no cancel reaches) gives up its wait for a lock held elsewhere then, rather
        than after ``LOCK_WAIT_S``, which the stop waited for."""
        try:
            await trio.sleep_forever()
        finally:
            self.store.stopping()

    def _hold(self, alerts: list[dict[str, Any]]) -> None:
        for alert in alerts:
            self._held[alert["id"]] = alert
            self._held.move_to_end(alert["id"])
        while len(self._held) > MAX_HELD_ALERTS:
            _, lost = self._held.popitem(last=False)
            log.error("alert %s: its latest state is dropped from memory (%d held, the "
                      "history store cannot be written)", lost.get("id"), MAX_HELD_ALERTS)
        self._m_held.set(len(self._held))

    async def _write_last(self) -> None:
        """At the stop: one last try (a lock waited for ``STOP_LOCK_WAIT_S`` at most) to
        write the alert states held and what was handed over but not yet written (an
        acknowledgement made just before the stop, with its outbox rows: sent after the
        restart)."""
        items: list[tuple[str, Any]] = []
        while True:
            try:
                items.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.ClosedResourceError):
                break
        events = [payload for kind, payload in items if kind == "alert"]
        self._hold([e["alert"] for e in events])
        if not items and not self._held and not self._held_archives:
            return
        archives = [h.item for h in self._held_archives.values()]
        archives += [(kind, payload) for kind, payload in items if kind != "alert"]
        lots = [payload for kind, payload in archives if kind == "lot"]
        wafers = [payload for kind, payload in archives if kind == "wafer"]
        try:
            await self.store.save_with_outbox(list(self._held.values()), lots, wafers,
                                              outbox_rows(self.webhooks, events, self._clock()))
        except Exception as exc:
            self._store_failed(exc)
            log.error("history store not written at the stop (%d alert states, %d lots, %d "
                      "wafers): %s", len(self._held), len(lots), len(wafers), exc)
            if archives:
                # not lost: no checkpoint stands for their eviction (``archives_unwritten``)
                names = [_archive_name(_archive_key(kind, payload)[0])
                         for kind, payload in archives]
                self._archives_given_up = len(names)
                log.error("%d lot/wafer archive(s) not written to the history store at the "
                          "stop: no checkpoint covers their eviction, the replay of the "
                          "frames at the next start writes them: %s%s", len(names),
                          ", ".join(names[:20]), " ..." if len(names) > 20 else "")
        else:
            self._held.clear()
            self._m_held.set(0)
        self._held_archives.clear()
        self._held_bytes = 0
        self._m_archives_held.set(0)
        self._done += len(items)

    async def _write_held(self) -> bool:
        """Write the alert states and archives held in memory; False (kept) if the
        store refuses."""
        held = list(self._held.values())
        archives = dict(self._held_archives)
        lots, wafers = self._split(archives)
        try:
            kept = await self.store.save(held, lots, wafers)
        except Exception as exc:
            self._store_failed(exc)  # a retry that fails is a failed write too
            log.warning("%d alert state(s) and %d lot/wafer archive(s) held in memory not "
                        "written yet: %s", len(held), len(archives), exc)
            return False
        for alert in held:  # (a newer state held meanwhile stays: not this one)
            if self._held.get(alert["id"]) is alert:
                del self._held[alert["id"]]
        self._m_held.set(len(self._held))
        self._written_archives(archives, kept)
        log.info("%d alert state(s) and %d lot/wafer archive(s) kept in memory while the "
                 "history store could not be written are written now", len(held),
                 len(archives))
        return True

    @staticmethod
    def _split(archives: dict[_ArchiveKey, _HeldArchive]
               ) -> tuple[list[tuple[str, dict[str, Any]]],
                          list[tuple[str, str, dict[str, Any]]]]:
        """Held archives as the store takes them: lots, wafers (each oldest first)."""
        lots = [h.item[1] for h in archives.values() if h.item[0] == "lot"]
        wafers = [h.item[1] for h in archives.values() if h.item[0] == "wafer"]
        return lots, wafers

    def _written_archives(self, archives: dict[_ArchiveKey, _HeldArchive], kept: int) -> None:
        """``archives`` (held when the write began) are in the store now."""
        for key, held in archives.items():  # (one held meanwhile stays: not this one)
            if self._held_archives.get(key) is held:
                del self._held_archives[key]
                self._held_bytes -= held.nbytes
        self._m_archives_held.set(len(self._held_archives))
        if kept:
            self._m_kept.inc(kept)
            log.info("%d lot/wafer archive(s) not replaced: the stored one is fuller "
                     "(a partial rebuild)", kept)

    async def _hold_archives(self, items: list[tuple[str, Any]]) -> None:
        """Keep archives the store could not take, to write them when it can.  One per
        lot (wafer) and pass: a lot archived again replaces the one held if at least as
        full, as in the store (else it is the one not written, ``hub_archives_kept_total``).
        Over ``MAX_HELD_ARCHIVES`` or ``MAX_HELD_ARCHIVE_BYTES`` the oldest go."""
        with trio.CancelScope(shield=True):  # (a stop now: held, for ``_write_last``)
            sizes = await trio.to_thread.run_sync(_json_sizes, items)
        for (kind, payload), nbytes in zip(items, sizes, strict=True):
            key, parts = _archive_key(kind, payload)
            if nbytes > MAX_HELD_ARCHIVE_BYTES:  # alone over the bound: not the others
                self._dropped(key, parts, nbytes)
                continue
            held = self._held_archives.get(key)
            if held is not None and held.parts > parts:
                self._m_kept.inc()
                continue
            if held is not None:  # (in its place: the order passes merge in stands)
                self._held_bytes -= held.nbytes
            self._held_archives[key] = _HeldArchive((kind, payload), parts, nbytes)
            self._held_bytes += nbytes
        while self._held_archives and (len(self._held_archives) > MAX_HELD_ARCHIVES
                                       or self._held_bytes > MAX_HELD_ARCHIVE_BYTES):
            key, lost = self._held_archives.popitem(last=False)
            self._held_bytes -= lost.nbytes
            self._dropped(key, lost.parts, lost.nbytes)
        self._m_archives_held.set(len(self._held_archives))

    def _dropped(self, key: _ArchiveKey, parts: int, nbytes: int) -> None:
        self._m_archives_dropped.inc()
        log.error("%s: its archive (%d parts, %d bytes) is dropped from memory unwritten "
                  "(%d archives, %d MB held at most while the history store cannot be "
                  "written): the history API will have no figures for it",
                  _archive_name(key), parts, nbytes, MAX_HELD_ARCHIVES,
                  MAX_HELD_ARCHIVE_BYTES // 2**20)

    async def _next_batch(self, retry_s: float) -> list[tuple[str, Any]]:
        """The events and archives handed over (waiting for the first); while alert states
        are held, nothing (``[]``) once ``retry_s`` has passed without any."""
        items: list[tuple[str, Any]] = []
        with trio.move_on_after(retry_s if self._held or self._held_archives else math.inf):
            items.append(await self._receive.receive())
        while items:
            try:
                items.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                break
        return items

    async def _tick_loop(self, state: LiveState | None, tick_s: float) -> None:
        while True:
            await trio.sleep(tick_s)
            now = self._clock()
            try:
                if state is not None:
                    state.tick(now)
                else:
                    self.engine.tick(now)
            except Exception:  # a failure boundary: one tick fails, not the hub
                report_internal_error(self.metrics, "alerts_tick", log,
                                      "live state / alert engine tick")

    async def _persist_loop(self) -> None:
        retry_s = RETRY_S
        while True:
            items = await self._next_batch(retry_s)
            if not items:  # only held states and archives to write: try again, less often
                retry_s = RETRY_S if await self._write_held() else min(retry_s * 2,
                                                                       RETRY_MAX_S)
                continue
            events = [payload for kind, payload in items if kind == "alert"]
            # Several events of one alert in a batch: the last carries its latest state.
            latest = {e["alert"]["id"]: e["alert"] for e in events}
            new_archives = [(kind, payload) for kind, payload in items if kind != "alert"]
            rows = outbox_rows(self.webhooks, events, self._clock())
            # the states and archives held (the store could not take them) go with the
            # batch, first: one writer, so an older state can never be written over a
            # newer one, and a lot's passes merge in the order they were archived
            held = dict(self._held)
            alerts = list({**held, **latest}.values())
            held_archives = dict(self._held_archives)
            lots, wafers = self._split(held_archives)
            lots += [payload for kind, payload in new_archives if kind == "lot"]
            wafers += [payload for kind, payload in new_archives if kind == "wafer"]
            try:
                kept, queued = await self.store.save_with_outbox(alerts, lots, wafers, rows)
            except Exception as exc:  # a full disk must not stop alerting
                self._store_failed(exc)
                log.error("history store write failed (%d alert events, %d lots, %d wafers): "
                          "%s", len(events), len(lots), len(wafers), exc)
                # sent all the same, the rows held in memory and written once the store
                # takes writes again (the outbox's run): lost only if the hub stops first;
                # the alerts' states and the archives too (this loop's retries)
                self._hold(list(latest.values()))
                await self._hold_archives(new_archives)
                queued = self.outbox.hold(rows)
                for url, key, _, _ in rows:
                    self._m_unrecorded.inc(url=shown_url(url))
                    log.warning("webhook %s: alert event %s is sent before its outbox row is "
                                "written (history store not written; row kept in memory)",
                                shown_url(url), key)
            else:
                for alert_id, alert in held.items():  # (one held since stays)
                    if self._held.get(alert_id) is alert:
                        del self._held[alert_id]
                self._m_held.set(len(self._held))
                retry_s = RETRY_S
                self._m_saved.inc(len(events))
                self._written_archives(held_archives, kept)
            for event in events:
                try:
                    key = event_key(event)
                    # a row there already was queued at open (resent) or is finished
                    self.webhooks.submit(event, {url for url, k in queued if k == key})
                except Exception:  # e.g. an event that is not the shape a webhook expects
                    report_internal_error(self.metrics, "webhook", log,
                                          "queueing an alert event for the webhooks")
            self._done += len(items)
            self._progress.set()
            self._progress = trio.Event()
