"""SIGHUP taken by a service (the hub's and the gateway's reload): the receiver both open
before they start, so a SIGHUP during their start-up is a reload once they run, never the
end of the process (SIGHUP's default action)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager

import trio


def sighup_receiver() -> AbstractContextManager[AsyncIterator[int] | None]:
    """SIGHUP taken from now on, to be read from the receiver it yields (signals wait
    there until read).  Only in the main thread, where signals are delivered (a service
    embedded in another program's thread does not take them), and where SIGHUP exists
    (not on Windows): None there."""
    if (not hasattr(signal, "SIGHUP")
            or threading.current_thread() is not threading.main_thread()):
        return contextlib.nullcontext()
    return trio.open_signal_receiver(signal.SIGHUP)


__all__ = ["sighup_receiver"]
