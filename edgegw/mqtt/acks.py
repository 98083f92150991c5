"""Which QoS 1 messages may be acknowledged, and which to recognise when they come again
(sans-IO: message ids and keys in, PUBACKs and checkpoint bytes out).

The promise: a QoS 1 reading is acknowledged to the broker only once what it became (a raw
reading, or its share of a throttle window) is durable in the gateway's frame store, and
a message the broker sends again after that is recognised and dropped, not counted twice.

Invariants
----------
I1  A message's content lives in exactly one **group**: the raw readings of the next put
    (``pending``), or one throttle's open windows (all channels of a throttle close
    together, so one group per throttle).  ``seal()`` gives every group whose records go
    into a put that put's number; ``durable(n)`` says the frame carrying put ``n``'s
    checkpoint is in the frame store, which covers every put before it.
I2  PUBACKs go out in the order the PUBLISHes arrived (MQTT 3.1.1 §4.6, 5.0 §4.6): the
    ledger keeps one entry per QoS 1 receipt and releases the longest durable prefix.  A
    message that stored nothing (bad payload, unrouted, poison) is durable at once, but
    still waits its turn.
I3  A key is ``packet id << 32 | crc32(topic, payload)``.  Every message whose content is in
    a sealed group stays *remembered* until its PUBACK is known to have reached the broker;
    the checkpoint written with each put holds the keys of the sealed groups still
    remembered, so it is never missing a message that is stored and might come again, and
    never claims one that is not stored (open groups are left out).
I4  "Known to have reached the broker" = a **fence** came back: the source sends an
    UNSUBSCRIBE for a filter it never uses after a run of PUBACKs; the broker reads a
    connection's packets in order, so its UNSUBACK proves it has read every PUBACK before it.
I5  After a reconnect the old connection's unacknowledged entries cannot be acknowledged
    any more: their keys become **orphans**.  A message arriving with the DUP flag whose key
    is remembered is a redelivery: it is not processed again, and is acknowledged when its
    original group is durable.  Orphans the broker did not send again are forgotten at the
    first fence sent after a fresh (non-DUP) QoS 1 message arrived (the broker re-sends a
    session's unacknowledged messages before new ones), or at once when the broker kept no
    session.  Keys restored from a checkpoint after a restart are orphans of this kind.

A false match needs a fresh message with the same packet id, topic and payload as one
remembered, flagged DUP: with a timestamp in the payload that cannot happen.
"""

from __future__ import annotations

import collections
import sys
from array import array
from typing import Any

_KEY_BYTES = 8
CHECKPOINT_VERSION = 1


class Group:
    """Messages whose content leaves the source in one put (``put`` is None while open)."""

    __slots__ = ("keys", "put", "remaining")

    def __init__(self, put: int | None = None) -> None:
        self.keys = array("Q")
        self.put = put
        self.remaining = 0  # keys of this group still remembered


#: messages that stored nothing: acknowledged in their turn, never remembered
DONE = Group(put=0)


def _to_bytes(keys: array[int]) -> bytes:
    if sys.byteorder == "little":
        return keys.tobytes()
    swapped = array("Q", keys)
    swapped.byteswap()
    return swapped.tobytes()


class CheckpointError(ValueError):
    pass


def keys_from_checkpoint(checkpoint: Any) -> array[int]:
    """The stored keys of a checkpoint written by ``AckLedger.checkpoint``."""
    if not isinstance(checkpoint, dict) or checkpoint.get("v") != CHECKPOINT_VERSION:
        raise CheckpointError(f"not an MQTT source checkpoint: {str(checkpoint)[:60]}")
    blob = checkpoint.get("stored", b"")
    if not isinstance(blob, bytes) or len(blob) % _KEY_BYTES:
        raise CheckpointError("MQTT source checkpoint: bad 'stored' keys")
    keys = array("Q")
    keys.frombytes(blob)
    if sys.byteorder != "little":
        keys.byteswap()
    return keys


class AckLedger:
    def __init__(self, restored: array[int] | None = None) -> None:
        self._entries: collections.deque[tuple[int, int, Group]] = collections.deque()
        self._remember: dict[int, Group] = {}
        self._orphans: dict[int, Group] = {}
        self._orphans_closable = False  # a fresh message came on this connection
        self._acked: list[tuple[int, Group]] = []  # acknowledged since the last fence
        self._fence: tuple[int, list[tuple[int, Group]], bool] | None = None
        self._sealed: list[Group] = []
        self._ready: list[Group] = []
        self.pending = Group()  # raw readings: the records of the next put
        self._puts = 0
        self._durable = 0
        self.duplicates = 0  # redeliveries recognised and dropped
        self.acked = 0  # PUBACKs released, ever
        if restored is not None and len(restored):
            group = Group(put=0)  # durable in an earlier life
            group.keys = restored
            for key in restored:
                if key not in self._remember:
                    self._remember[key] = group
                    self._orphans[key] = group
                    group.remaining += 1
            self._sealed.append(group)

    # ------------------------------------------------------------ receiving

    def redelivered(self, mid: int, key: int) -> bool:
        """For a message flagged DUP: True when its content is already in hand (stored or
        in a group); it is then acknowledged with that group and must not be processed."""
        group = self._remember.get(key)
        if group is None:
            return False
        self._orphans.pop(key, None)
        self._entries.append((mid, key, group))
        self.duplicates += 1
        return True

    def add(self, mid: int, key: int, group: Group | None, fresh: bool = True) -> None:
        """A QoS 1 message was processed; its content went into ``group`` (None: nothing
        to store).  ``fresh``: it did not carry the DUP flag."""
        if fresh:
            self._orphans_closable = True
        if group is None:
            self._entries.append((mid, 0, DONE))
            return
        old = self._remember.get(key)
        if old is not group:
            if old is not None:  # the same key for a new message (packet id reused)
                old.remaining -= 1
                self._orphans.pop(key, None)
            self._remember[key] = group
            group.remaining += 1
        group.keys.append(key)
        self._entries.append((mid, key, group))

    # ------------------------------------------------------------ putting

    def ready(self, group: Group) -> None:
        """``group``'s records (its closed windows) are now among the records of the next put."""
        self._ready.append(group)

    def seal(self) -> int:
        """The next put takes the pending records and the ready groups: its number."""
        self._puts += 1
        n = self._puts
        for group in self._ready:
            group.put = n
            self._sealed.append(group)
        self.pending.put = n
        self._sealed.append(self.pending)
        self._ready = []
        self.pending = Group()
        return n

    def checkpoint(self, put: int) -> dict[str, Any]:
        """The source checkpoint for put ``put`` (call right after ``seal``): the keys of
        every sealed group still remembered (I3)."""
        self._sealed = [g for g in self._sealed if g.remaining > 0]
        stored = b"".join(_to_bytes(g.keys) for g in self._sealed)
        return {"v": CHECKPOINT_VERSION, "put": put, "stored": stored}

    def durable(self, put: int) -> None:
        if put > self._durable:
            self._durable = put

    # ------------------------------------------------------------ acknowledging

    def acks(self) -> list[int]:
        """Packet ids to acknowledge now, in order (I2); they count as sent."""
        out: list[int] = []
        entries = self._entries
        durable = self._durable
        while entries:
            put = entries[0][2].put
            if put is None or put > durable:
                break
            mid, key, group = entries.popleft()
            out.append(mid)
            if group is not DONE:
                self._acked.append((key, group))
        self.acked += len(out)
        return out

    @property
    def ack_ready(self) -> bool:
        if not self._entries:
            return False
        put = self._entries[0][2].put
        return put is not None and put <= self._durable

    @property
    def fence_wanted(self) -> bool:
        return self._fence is None and bool(
            self._acked or (self._orphans and self._orphans_closable))

    def fence_sent(self, mid: int) -> None:
        self._fence = (mid, self._acked, self._orphans_closable and bool(self._orphans))
        self._acked = []

    def fence_done(self, mid: int) -> None:
        """The broker answered fence ``mid``: it has read every PUBACK sent before it (I4)."""
        if self._fence is None or self._fence[0] != mid:
            return
        _, acked, close_orphans = self._fence
        self._fence = None
        for key, group in acked:
            self._forget(key, group)
        if close_orphans:
            for key, group in list(self._orphans.items()):
                self._forget(key, group)
            self._orphans.clear()

    def _forget(self, key: int, group: Group) -> None:
        if self._remember.get(key) is group:
            del self._remember[key]
            group.remaining -= 1

    def connected(self, session_present: bool) -> None:
        """A new connection: nothing of the old one can be acknowledged any more (I5)."""
        pending = [(key, group) for _, key, group in self._entries if group is not DONE]
        if self._fence is not None:
            pending += self._fence[1]
        for key, group in pending + self._acked:
            if self._remember.get(key) is group:
                self._orphans[key] = group
        self._entries.clear()
        self._acked = []
        self._fence = None
        self._orphans_closable = False
        if not session_present:  # the broker kept nothing: nothing comes again
            for key, group in list(self._orphans.items()):
                self._forget(key, group)
            self._orphans.clear()

    # ------------------------------------------------------------ what tests and metrics read

    @property
    def unacked(self) -> int:
        """QoS 1 messages received on this connection and not acknowledged yet."""
        return len(self._entries)

    @property
    def remembered(self) -> int:
        return len(self._remember)

    @property
    def orphans(self) -> int:
        return len(self._orphans)
