"""SIGHUP on a hub (``systemctl reload``): the TLS files, then the config file, read again
and applied while the hub runs -- the Trio shell around ``reload.py``'s pure plan.

What is taken (docs/operations.md, "Reload"): the ``[gateways]`` table (a connection the
new table no longer admits is closed, 4001), ``[auth]`` and its key files while sign-in
stays on (the open dashboard connections checked again: ``auth_rechecks``), the
``[alerts]`` rules and webhooks (``alerts_reloader``); every other change is logged as
waiting for a restart.  A file that does not load, or names key files that cannot be used, changes
nothing; each reload is a failure boundary (``hub_reload``): a bug ends that reload, not
the hub.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import trio

from ..auth.hub import digest_matches
from ..metrics import report_internal_error
from .config import AlertsConfig, HubConfig
from .reload import plan as reload_plan

if TYPE_CHECKING:
    from .ingest import Ingest

log = logging.getLogger("edgegw.hub")


class HubReloader:
    """The SIGHUP handler of one hub (``Ingest.reloader``)."""

    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest
        #: reads the config file this hub was started from again (``edgegw hub --config``
        #: sets it); None, as in an embedded hub: SIGHUP reloads the TLS certificate only
        self.config_source: Callable[[], HubConfig] | None = None
        #: hands a SIGHUP's ``[alerts]`` (rules and webhooks) to the running alert service
        #: -> a line for the log (raises OSError, ValueError before anything changes when
        #: a webhook's CA file cannot be used); None: this hub takes them at a restart only
        self.alerts_reloader: Callable[[AlertsConfig], str] | None = None
        #: after a SIGHUP took new ``[auth]``: each checks its open connections again
        #: (``HubSecurity.still_signed_in``) -> how many it closed
        self.auth_rechecks: list[Callable[[], int]] = []
        m = ingest.metrics
        self.m_reloads = m.counter("hub_config_reloads_total",
                                   "config file reloads (SIGHUP), by outcome")
        self.m_revoked = m.counter(
            "hub_connections_revoked_total", "gateway connections closed (4001) because a "
            "config reload removed their gateway or changed its token")

    async def watch(self, signals: AsyncIterator[int] | None, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The SIGHUPs of ``signals`` (``edgegw.sighup.sighup_receiver``, opened as the hub
        begins to start), for as long as the hub runs: the TLS certificate and key read
        again, then the config file (``reload_config``).  Taken even with nothing to
        reload."""
        task_status.started()
        if signals is not None:
            async for _ in signals:
                if self.ingest.security.tls is None and self.config_source is None:
                    log.warning("SIGHUP: nothing to reload (no [tls], no config file)")
                try:  # a failure boundary: a reload's bug ends that reload, not the hub
                    if self.ingest.security.tls is not None:
                        await self.ingest.security.reload_tls()
                    if self.config_source is not None:
                        await self.reload_config()
                except Exception:
                    self.m_reloads.inc(outcome="failed")
                    report_internal_error(self.ingest.metrics, "hub_reload", log, "SIGHUP reload")

    async def reload_config(self) -> bool:
        """Read the config file again and take its [gateways] table (edgegw/hub/reload.py):
        the next handshakes are checked against it, and a connection whose gateway it no
        longer lists, or whose token it no longer matches, is closed with 4001.  Its
        [auth] (sign-in on before and after) checks every request from now on, and the
        open connections are checked again (``auth_rechecks``).  Its [alerts] rules and
        webhooks go to ``alerts_reloader``, if set.  Other sections that changed are named
        in the log as waiting for a restart.  A file that cannot be read, is not a valid
        config or names key files (or a webhook CA file) that cannot be used leaves the
        running one as it is (logged with its errors, counted).  False when nothing was
        taken."""
        if self.config_source is None:
            return False
        try:
            read = await trio.to_thread.run_sync(self.config_source)
        except Exception as exc:  # a reload must never end the hub: ConfigError, or a bug
            self.m_reloads.inc(outcome="failed")
            log.error("SIGHUP: the config file was not reloaded, the running one stays: %s",
                      str(exc).replace("\n", "; "))
            return False
        ingest = self.ingest
        change = reload_plan(ingest.config, read, alerts=self.alerts_reloader is not None)
        verifier = None
        if change.auth_reload and change.config.auth is not None:
            try:  # before anything is applied: a key file that fails changes nothing
                verifier = await self.ingest.security.load_auth(change.config.auth)
            except ValueError as exc:
                self.m_reloads.inc(outcome="failed")
                log.error("SIGHUP: the config file was not reloaded, the running one stays: "
                          "%s", exc)
                return False
        if change.alerts_changed and self.alerts_reloader is not None:
            # first: should it fail (a webhook's CA file that cannot be used; a bug),
            # nothing is taken and the next SIGHUP tries all
            try:
                taken = self.alerts_reloader(change.config.alerts)
            except (OSError, ValueError) as exc:
                self.m_reloads.inc(outcome="failed")
                log.error("SIGHUP: the config file was not reloaded, the running one stays: "
                          "[alerts.webhooks]: %s", exc)
                return False
            log.warning("SIGHUP: alert rules reloaded: %s", taken)
        ingest.config = change.config
        self.ingest.security.use_gateways(change.config)
        if verifier is not None and change.config.auth is not None:
            self.ingest.security.use_auth(change.config.auth, verifier)
            signed_out = sum(recheck() for recheck in self.auth_rechecks)
            log.warning("SIGHUP: sign-in ([auth]) reloaded%s",
                        f"; /ws/live connections closed (4401): {signed_out}" if signed_out
                        else "")
        self.m_reloads.inc(outcome="ok")
        closed = []
        for session in list(ingest.connected.sessions.values()):
            auth = change.config.gateways.get(session.gateway)
            if auth is None:
                why = "no longer configured"
            elif not digest_matches(auth, session.token_digest):
                why = "its token was changed"
            else:
                continue
            session.revoked = f"gateway {session.gateway!r}: {why} (hub config reloaded)"
            session.cancel_scope.cancel()
            closed.append(session.gateway)
        if closed:
            self.m_revoked.inc(len(closed))
        log.warning("SIGHUP: gateways reloaded: %s%s", change.summary,
                    f"; connections closed (4001): {', '.join(sorted(closed))}" if closed
                    else "")
        if change.restart_needed:
            log.warning("SIGHUP: [%s] changed in the config file: not applied until the hub "
                        "restarts (a reload takes [gateways], [auth]%s)",
                        "], [".join(change.restart_needed),
                        " and [alerts]" if self.alerts_reloader else "")
        self.ingest.security.log_warnings()
        return True
