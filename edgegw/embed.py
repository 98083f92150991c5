"""Running a gateway inside a test program's own Python process.

From Trio code::

    async with edgegw.open_gateway(config) as gw:
        await gw.sink.put(records)

From ordinary (threaded) code, e.g. a test program's hooks::

    gw = edgegw.EmbeddedGateway(config)   # starts a Trio loop in a daemon thread
    gw.put(records)                      # thread-safe; waits only if the store is full
    gw.close()                           # flushes and waits (bounded) for the hub's acks;
                                         # True when the hub acknowledged everything

docs/embedding.md is the guide, with a worked example (examples/embedded_test_program.py).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import trio

from .config import build
from .gateway.config import GatewayConfig, load_gateway_config
from .gateway.service import Gateway
from .records import KIND_OF, Record
from .startup import service_failure

log = logging.getLogger("edgegw.embed")


def _shown(value: Any) -> str:
    text = repr(value)
    return f"a {type(value).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def _config(config: GatewayConfig | dict[str, Any] | str) -> GatewayConfig:
    if isinstance(config, GatewayConfig):
        return config
    if isinstance(config, dict):
        return build(GatewayConfig, config, "<embedded>")
    return load_gateway_config(config)


@asynccontextmanager
async def _serving(config: GatewayConfig | dict[str, Any] | str) -> AsyncIterator[Gateway]:
    async with trio.open_nursery() as nursery:
        gw = Gateway(_config(config))
        await nursery.start(gw.run)
        try:
            yield gw
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_gateway(config: GatewayConfig | dict[str, Any] | str,
                       drain_timeout: float = 10.0) -> AsyncIterator[Gateway]:
    """A running gateway for the duration of the block; on exit it flushes and waits up to
    ``drain_timeout`` seconds for the hub to acknowledge what it holds."""
    async with _serving(config) as gw:
        try:
            yield gw
        finally:
            with trio.CancelScope(shield=True):
                await gw.drain(drain_timeout)


class EmbeddedGateway:
    """A gateway on its own Trio loop in a daemon thread, fed from any thread.  Also a
    context manager: ``with EmbeddedGateway(config) as gw:`` closes it on the way out."""

    def __init__(self, config: GatewayConfig | dict[str, Any] | str,
                 drain_timeout: float = 10.0) -> None:
        self.config = _config(config)
        self.drain_timeout = drain_timeout
        self.gateway: Gateway | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        #: after close(): True when the hub acknowledged every record put
        self.delivered: bool | None = None
        #: the process whose thread runs the gateway: a forked child has no such thread
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._main, name="edgegw-gateway", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        # a program that ends without close() (an exception, sys.exit in a hook) would
        # lose what the batcher holds: the interpreter stops daemon threads as they are
        atexit.register(self._at_exit)

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with _serving(self.config) as gw:
                self.gateway = gw
                self._ready.set()
                await self._stop.wait()
                self.delivered = await gw.drain(self.drain_timeout)

        try:
            trio.run(main)
        except BaseException as exc:  # surfaced to the caller of put(), close(), __init__
            # a failing spool disk (SpoolFailed): its one line, not Trio's exception groups
            self._error = service_failure(exc) or exc
        finally:
            self._ready.set()

    def _usable(self) -> trio.lowlevel.TrioToken:
        """The running gateway's token, or the error that says why there is none."""
        if os.getpid() != self._pid:
            # its Trio loop is a thread of the parent: a call would wait for ever
            raise RuntimeError(
                f"this embedded gateway runs in process {self._pid}, not in this forked "
                "child: start one in the child, with a state_dir of its own")
        if self._error is not None:
            raise self._error  # the gateway stopped by itself (its spool's disk failed)
        if self._token is None or self._stop is None or self._stop.is_set():
            raise RuntimeError("the embedded gateway is closed")
        return self._token

    def _stopped(self) -> BaseException:
        """What to raise when the gateway's loop ended during a call."""
        self._thread.join()
        return self._error or RuntimeError("the embedded gateway is closed")

    def put(self, records: Iterable[Record], source: str = "embedded") -> None:
        """Hand records to the gateway; returns once they are queued for sending (in the
        spool, when the config has one, once a frame is cut).  ``source`` labels them in
        the metrics; each record's own ``source`` field is what the hub sees.  Raises
        ``edgegw.spool.SpoolFailed`` once the spool's disk has failed (the gateway then
        stopped, as a crash would: docs/embedding.md), ``RuntimeError`` after ``close()``
        and in a forked child, ``TypeError`` for anything in ``records`` that is not a
        record (nothing of that put is taken)."""
        token = self._usable()
        assert self.gateway is not None
        # (a generator is read once, here)
        batch = records if isinstance(records, (list, tuple)) else list(records)
        for record in batch:  # the caller's mistake, told to the caller (the hook's line)
            if type(record) not in KIND_OF or type(record[0]) is not str:
                raise TypeError(
                    "put takes records of edgegw.records (PartResult, ParametricResult, "
                    f"...) whose source is text; got {_shown(record)}")
        try:
            trio.from_thread.run(self.gateway.sink.put, batch, None, source,
                                 trio_token=token)
        except trio.RunFinishedError:
            raise self._stopped() from None

    def stats(self) -> dict[str, Any]:
        token = self._usable()
        assert self.gateway is not None
        try:
            return trio.from_thread.run_sync(self.gateway.stats, trio_token=token)
        except trio.RunFinishedError:
            raise self._stopped() from None

    def close(self) -> bool:
        """Flush, wait up to ``drain_timeout`` seconds for the hub's acknowledgements, and
        stop.  True when the hub acknowledged every record; False when some are still
        waiting -- in the spool (if configured), which sends them on the next start.  In a
        forked child it does nothing and returns False: the gateway is the parent's."""
        if os.getpid() != self._pid:
            return False
        atexit.unregister(self._at_exit)
        if self._token is not None and self._stop is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):  # it stopped by itself
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return bool(self.delivered)

    def _at_exit(self) -> None:
        """At interpreter exit without ``close()``: close, as the program did not."""
        if os.getpid() != self._pid or not self._thread.is_alive():
            return  # a forked child's exit, or the gateway already stopped by itself
        log.warning("the program exits without closing its embedded gateway: flushing, and "
                    "waiting up to %g s for the hub's acknowledgements", self.drain_timeout)
        try:
            self.close()
        except Exception as exc:  # at exit: said, not raised over the program's own end
            log.error("closing the embedded gateway at exit: %s", exc)

    def __enter__(self) -> EmbeddedGateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["EmbeddedGateway", "open_gateway"]
