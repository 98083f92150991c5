"""Running a gateway inside a test program's own Python process.

From Trio code::

    async with edgegw.open_gateway(config) as gw:
        await gw.sink.put(records)

From ordinary (threaded) code, e.g. a test program's hooks::

    gw = edgegw.EmbeddedGateway(config)   # starts a Trio loop in a daemon thread
    gw.put(records)                      # thread-safe; waits only if the store is full
    gw.close()                           # flushes and waits (bounded) for the hub's acks
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from .config import build
from .gateway.config import GatewayConfig, load_gateway_config
from .gateway.service import Gateway
from .records import Record


def _config(config: GatewayConfig | dict[str, Any] | str) -> GatewayConfig:
    if isinstance(config, GatewayConfig):
        return config
    if isinstance(config, dict):
        return build(GatewayConfig, config, "<embedded>")
    return load_gateway_config(config)


@asynccontextmanager
async def open_gateway(config: GatewayConfig | dict[str, Any] | str,
                       drain_timeout: float = 10.0) -> AsyncIterator[Gateway]:
    """A running gateway for the duration of the block; on exit it flushes and waits up to
    ``drain_timeout`` seconds for the hub to acknowledge what it holds."""
    async with trio.open_nursery() as nursery:
        gw = Gateway(_config(config))
        await nursery.start(gw.run)
        try:
            yield gw
        finally:
            with trio.CancelScope(shield=True):
                await gw.drain(drain_timeout)
            nursery.cancel_scope.cancel()


class EmbeddedGateway:
    """A gateway on its own Trio loop in a daemon thread, fed from any thread."""

    def __init__(self, config: GatewayConfig | dict[str, Any] | str,
                 drain_timeout: float = 10.0) -> None:
        self.config = _config(config)
        self.drain_timeout = drain_timeout
        self.gateway: Gateway | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="edgegw-gateway", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with open_gateway(self.config, self.drain_timeout) as gw:
                self.gateway = gw
                self._ready.set()
                await self._stop.wait()

        try:
            trio.run(main)
        except BaseException as exc:  # surfaced to the caller of __init__ or close()
            self._error = exc
        finally:
            self._ready.set()

    def put(self, records: Sequence[Record], source: str = "embedded") -> None:
        """Hand records to the gateway; returns once they are queued for sending."""
        assert self.gateway is not None and self._token is not None
        trio.from_thread.run(self.gateway.sink.put, records, None, source,
                             trio_token=self._token)

    def stats(self) -> dict[str, Any]:
        assert self.gateway is not None and self._token is not None
        return trio.from_thread.run_sync(self.gateway.stats, trio_token=self._token)

    def close(self) -> None:
        if self._token is not None and self._stop is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join()
        if self._error is not None:
            raise self._error


__all__ = ["EmbeddedGateway", "open_gateway"]
