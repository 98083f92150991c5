"""SIGHUP taken by a service (the hub's and the gateway's reload): the receiver both open
before they start, so a SIGHUP during their start-up is a reload once they run, never the
end of the process (SIGHUP's default action).  Before that receiver opens -- the command's
imports, its config read, its start-up checks: half a second -- ``hold_sighup``, called
first thing by ``edgegw hub`` and ``edgegw gateway``, keeps a SIGHUP for it."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager

import trio

#: a SIGHUP came while held (``hold_sighup``), not yet passed to a receiver
_held = False


def _takes_signals() -> bool:
    """Signals are delivered to the main thread (a service embedded in another program's
    thread does not take them), and Windows has no SIGHUP."""
    return (hasattr(signal, "SIGHUP")
            and threading.current_thread() is threading.main_thread())


def hold_sighup() -> None:
    """From now on a SIGHUP is kept, not the end of the process, and passed to the next
    ``sighup_receiver`` opened (a service's start-up comes between); after a receiver
    closes (a service stopping), one is kept again."""
    if _takes_signals():
        signal.signal(signal.SIGHUP, _hold)


def _hold(signum: int, frame: object) -> None:
    global _held
    _held = True


def sighup_receiver() -> AbstractContextManager[AsyncIterator[int] | None]:
    """SIGHUP taken from now on, to be read from the receiver it yields (signals wait
    there until read), a SIGHUP held before it (``hold_sighup``) first.  Only where
    signals are taken: None elsewhere."""
    if not _takes_signals():
        return contextlib.nullcontext()
    return _receiver()


@contextlib.contextmanager
def _receiver() -> Iterator[AsyncIterator[int]]:
    global _held
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        if _held:
            _held = False
            signal.raise_signal(signal.SIGHUP)  # to the receiver: read as any other
        yield signals


__all__ = ["hold_sighup", "sighup_receiver"]
