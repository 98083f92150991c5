"""Failpoints: named places where a test makes a real process fail on purpose.

Whole-system fault tests need to stop a gateway or hub at an exact point of its work (a
frame durable but not yet acknowledged, a transaction written but not committed), not
after a sleep that races the process.  Code marks such points with ``hit("name")``; the
environment variable ``EDGEGW_FAILPOINTS`` arms them for one process::

    EDGEGW_FAILPOINTS="gateway.frame_stored=3:kill;hub.after_commit=5:kill"

``name=N:action`` fires on the N-th hit (``name=action`` on the first).  Actions:
``kill`` (SIGKILL to itself: no cleanup, no flush, as a crash or an OOM kill),
``exit`` (``os._exit(70)``) and ``stop`` (SIGSTOP to itself: the whole process frozen at
that point until someone sends SIGCONT, as in a VM freeze, a swap storm or a long GC
pause; then it carries on from there) and ``sleep=S`` (the calling thread sleeps S
seconds, once: at ``hub.mid_commit``, which runs in the store's worker thread, a slow
disk commit while the Trio loop goes on running).  Unarmed, ``hit`` is a dictionary lookup on an
empty dict.

Points in the code:

==========================  ==========================================================
``service.starting``        ``edgegw hub`` or ``edgegw gateway`` has read its config and
                            is about to start the service
``gateway.frame_stored``    a frame is durable in the frame store (``append`` returned)
``requeue.entry_stored``    ``edgegw dead-letters requeue`` stored one entry as a frame
``hub.mid_commit``          the hub's frame transaction is written, not yet committed
``hub.after_commit``        a commit is durable; its ACK has not been sent
``cluster.checkpoint``      a partition owner has captured its state and is about to
                            write the checkpoint under its lease token
``cluster.mid_checkpoint``  the checkpoint's transaction holds the partition's fence row
                            (checked, share-locked), the checkpoint not yet written
``cluster.mid_commit``      a cluster commit is written, its rows (the gateways', the
                            partition heads) locked, not yet committed
==========================  ==========================================================
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

ENV = "EDGEGW_FAILPOINTS"


def _parse(spec: str) -> dict[str, list[Any]]:
    armed: dict[str, list[Any]] = {}  # name -> [count, action]
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        name, _, action = item.partition("=")
        count, _, what = action.rpartition(":")
        if what not in ("kill", "exit", "stop") and not _sleep_seconds(what):
            raise ValueError(f"{ENV}: unknown action {what!r} in {item!r} "
                             "(kill, exit, stop or sleep=S)")
        armed[name.strip()] = [int(count) if count else 1, what]
    return armed


def _sleep_seconds(action: str) -> float | None:
    """S of a ``sleep=S`` action (a positive number), else None."""
    kind, _, seconds = action.partition("=")
    try:
        return float(seconds) if kind == "sleep" and float(seconds) > 0 else None
    except ValueError:
        return None


_armed = _parse(os.environ.get(ENV, ""))


def hit(name: str) -> None:
    """Mark a failpoint; fires when the environment armed it and its count is reached."""
    if not _armed:
        return
    entry = _armed.get(name)
    if entry is None:
        return
    entry[0] -= 1
    if entry[0] > 0:
        return
    seconds = _sleep_seconds(str(entry[1]))
    if seconds is not None:
        del _armed[name]  # once, as stop
        time.sleep(seconds)
        return
    if entry[1] == "stop":
        del _armed[name]  # once: after SIGCONT the process goes on as if unarmed
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if entry[1] == "kill" and hasattr(signal, "SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(70)


__all__ = ["ENV", "hit"]
