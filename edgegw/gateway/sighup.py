"""SIGHUP on a gateway (``systemctl reload``): the config file read again, and the gateway
started again from it inside the same process.

A gateway's running parts (its sources, the uplink, the spool) all hang on the config, and
a restart costs nothing: the spool is flushed, each source starts again at its stored
checkpoint, the hub acknowledges what it has -- nothing lost, nothing twice.  So a reload
*is* a restart, with two differences that matter on a test floor (docs/operations.md,
"Reload"): a file that does not load or does not pass the start-up checks changes nothing
-- the running gateway goes on, where a restart would have left the service down -- and a
gateway that does not start from the new file is started again from the one before.
Each reload is a failure boundary (``gateway_reload``): a bug ends that reload, never the
gateway.  Without SIGHUP handling at all, the signal's default action ended the process.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..metrics import report_internal_error
from ..sighup import sighup_receiver
from ..startup import ServiceFailed, describe
from .config import GatewayConfig
from .service import Gateway

log = logging.getLogger("edgegw.gateway")

RELOADS_METRIC = "gateway_config_reloads_total"
RELOADS_HELP = "config file reloads (SIGHUP), by outcome (ok, failed)"


@dataclass
class _Running:
    """One gateway started by ``GatewayReloader``: stopped by cancelling ``scope``,
    gone once ``done`` is set."""

    gateway: Gateway
    scope: trio.CancelScope
    done: trio.Event


class GatewayReloader:
    """``edgegw gateway --config FILE``: one ``Gateway`` at a time, made again from the
    file on each SIGHUP (``config_source`` reads and validates it; ``check`` runs the
    command's start-up checks on it: directories, addresses, TLS files)."""

    def __init__(self, config: GatewayConfig, config_source: Callable[[], GatewayConfig],
                 check: Callable[[GatewayConfig], None] | None = None,
                 make: Callable[[GatewayConfig], Gateway] = Gateway) -> None:
        self.config = config
        self.config_source = config_source
        self.check = check
        self.make = make
        self.gateway = make(config)
        #: reload outcomes so far: each new gateway's metrics carry them on
        self.outcomes: Counter[str] = Counter()

    async def run(self, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        # taken before the gateway starts: a SIGHUP from then on reloads, never ends the
        # process (None: not in the main thread, or no SIGHUP here)
        with sighup_receiver() as signals:
            async with trio.open_nursery() as nursery:
                running = await nursery.start(self._run_one, self.gateway)
                self._count(running.gateway)
                task_status.started(running.gateway)
                if signals is None:
                    return
                async for _ in signals:
                    try:  # a failure boundary: a reload's bug ends that reload only
                        running = await self.reload(nursery, running)
                    except ServiceFailed:
                        raise  # no gateway runs any more: the process ends
                    except Exception:
                        self.outcomes["failed"] += 1
                        self._count(running.gateway)
                        report_internal_error(running.gateway.metrics, "gateway_reload", log,
                                              "SIGHUP reload")

    async def reload(self, nursery: trio.Nursery, running: _Running) -> _Running:
        """Read the file again; when it loads and passes the checks, stop ``running`` (as
        SIGTERM does) and start a gateway from it -- from the previous config when that
        one does not start.  The gateway now running."""
        try:
            config = await trio.to_thread.run_sync(self.config_source)
            if self.check is not None:
                await trio.to_thread.run_sync(self.check, config)
        except Exception as exc:  # ConfigError, StartupError; or a bug: never the gateway
            self.outcomes["failed"] += 1
            self._count(running.gateway)
            log.error("SIGHUP: the config file was not reloaded, the gateway goes on as it "
                      "was: %s", str(exc).replace("\n", "; "))
            return running
        log.warning("SIGHUP: restarting gateway %s with the config file read again",
                    config.gateway.id)
        running.scope.cancel()
        await running.done.wait()
        stopped = running.gateway
        try:
            running = await nursery.start(self._run_one, self._made(config, stopped))
        except Exception as exc:
            self.outcomes["failed"] += 1
            log.error("SIGHUP: the gateway did not start with the config file read again "
                      "(%s): started again with the one before", describe(exc))
            try:  # it ran from this config a moment ago
                running = await nursery.start(self._run_one, self._made(self.config, stopped))
            except Exception as again:  # the process ends, as a failed start does
                raise ServiceFailed(
                    "SIGHUP: the gateway started neither from the config file read again "
                    f"nor from the one before: {describe(again)}") from again
        else:
            self.outcomes["ok"] += 1
            self.config = config
            log.warning("SIGHUP: gateway %s running with the config file read again",
                        config.gateway.id)
        self.gateway = running.gateway
        self._count(running.gateway)
        return running

    def _made(self, config: GatewayConfig, stopped: Gateway) -> Gateway:
        """A gateway made from ``config`` whose counters go on from the stopped one's: a
        reload is a restart, but the process's counts are not lost to it."""
        gateway = self.make(config)
        gateway.metrics.carry_on(stopped.metrics)
        return gateway

    async def _run_one(self, gateway: Gateway, *,
                       task_status: trio.TaskStatus[_Running] = trio.TASK_STATUS_IGNORED
                       ) -> None:
        scope = trio.CancelScope()
        done = trio.Event()
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(gateway.run)
                    task_status.started(_Running(gateway, scope, done))
        finally:
            done.set()

    def _count(self, gateway: Gateway) -> None:
        """The reload outcomes so far on ``gateway``'s metrics (set: the reloader holds the
        count)."""
        metric = gateway.metrics.counter(RELOADS_METRIC, RELOADS_HELP)
        for outcome in ("ok", "failed"):
            metric.set(self.outcomes[outcome], outcome=outcome)


__all__ = ["GatewayReloader"]
