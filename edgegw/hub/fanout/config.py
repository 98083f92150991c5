"""The ``/ws/live`` settings and constants: subprotocols, the slow-client close code, the
``[live]`` config section, and what a subscription pattern may be."""

from __future__ import annotations

import dataclasses
import sys
from typing import Annotated, Literal

from ...config import Range
from ...topicfilter import filter_problem

SUBPROTOCOL_CBOR = "edgegw.live.v1.cbor"
SUBPROTOCOL_JSON = "edgegw.live.v1.json"
SUBPROTOCOLS = (SUBPROTOCOL_CBOR, SUBPROTOCOL_JSON)

CLOSE_TOO_SLOW = 4008
CLOSE_TOO_SLOW_REASON = "too slow"
# the client's token expired: sign in again (a fresh token) and reconnect
CLOSE_TOKEN_EXPIRED = 4401

# A client's subscribe arguments are bounded so one request cannot make the hub match an
# unbounded number of patterns against every topic.
MAX_PATTERN_LENGTH = 256


def pattern_error(pattern: object) -> str | None:
    """Why ``pattern`` is not a valid subscription pattern, or None when it is: MQTT filter
    rules (``edgegw.topicfilter``) and a length bound."""
    if not isinstance(pattern, str):
        return "a topic pattern must be a string"
    if not pattern:
        return "a topic pattern must not be empty"
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"a topic pattern must be at most {MAX_PATTERN_LENGTH} characters"
    problem = filter_problem(pattern)
    return f"{problem}: {pattern!r}" if problem else None


@dataclasses.dataclass(frozen=True)
class LiveConfig:
    """How the hub serves ``/ws/live`` (the hub config's ``[live]`` section)."""

    # frames of updates per second per client, at most
    ui_rate: Annotated[float, Range(0.1, 1000)] = 20.0
    # unsent frames a client may have queued before it is "too slow"
    queue_frames: Annotated[int, Range(2, 1_000_000)] = 64
    # deltas kept per channel for resume ... and at most this many list rows (dies, points)
    history: Annotated[int, Range(0, 1_000_000)] = 1024
    history_rows: Annotated[int, Range(0, 100_000_000)] = 50_000
    # Snapshots built per tick, in list rows (a wafer map: one per die); more wait for the
    # next tick.  At least one is always built.
    snapshot_rows_per_tick: Annotated[int, Range(1, 100_000_000)] = 5_000
    max_patterns: Annotated[int, Range(1, 100_000)] = 256  # subscriptions per client
    # a client whose writes make no progress this long is closed; a closed slow client's
    # write in progress may finish this long
    stall_timeout: Annotated[float, Range(0.1, 3600)] = 30.0
    close_grace: Annotated[float, Range(0, 3600)] = 5.0
    event_prefixes: tuple[str, ...] = ("alert/",)  # channels where every event matters
    # permessage-deflate for wall screens on thin site links (docs/live-protocol.md,
    # "Compression"): accepted from clients that offer it; smaller frames go plain.  One
    # compressed frame is shared by every such client, as a plain one is.
    compression: Literal["off", "permessage-deflate"] = "off"
    compression_level: Annotated[int, Range(1, 9)] = 1
    compression_min_bytes: Annotated[int, Range(0, 64 << 20)] = 1024
    # a tick's socket writes made by a worker thread, not the event loop's: halves the
    # loop's CPU per tick, but on a busy 2-core host end-to-end latency got worse
    # (docs/performance.md, "the writes in a writer thread"); for a hub with cores to spare
    write_thread: bool = False
    # the same writes made by a writer process (no GIL shared with the hub's thread;
    # docs/performance.md, "the writes in a writer process")
    write_process: bool = False
    # dies a wafer of the live state keeps (docs/live-topics.md, "Caps"): a part result of a
    # new die beyond it is not applied (too_many_dies).  Twice the largest real wafers
    # (~100,000 dies), so invented X/Y cannot grow a map and its snapshot without bound
    max_dies_per_wafer: Annotated[int, Range(1, 100_000_000)] = 200_000
    # sensor channels the live state keeps, hub-wide (a new one at the cap pushes out the
    # oldest of the gateway holding the most), and tests a gateway brings to a lot
    max_sensors: Annotated[int, Range(1, 10_000_000)] = 5_000
    max_tests_per_lot: Annotated[int, Range(1, 10_000_000)] = 20_000

    def validate(self) -> list[tuple[str, str]]:
        errors: list[tuple[str, str]] = []
        if not (0 < self.ui_rate <= 1000):
            errors.append(("ui_rate", "must be > 0 and <= 1000 frames per second"))
        if self.queue_frames < 2:
            errors.append(("queue_frames", "must be >= 2"))
        if self.history < 0:
            errors.append(("history", "must be >= 0"))
        if self.history_rows < 0:
            errors.append(("history_rows", "must be >= 0"))
        if self.snapshot_rows_per_tick < 1:
            errors.append(("snapshot_rows_per_tick", "must be >= 1"))
        if self.max_patterns < 1:
            errors.append(("max_patterns", "must be >= 1"))
        if self.stall_timeout <= 0:
            errors.append(("stall_timeout", "must be > 0"))
        if self.close_grace < 0:
            errors.append(("close_grace", "must be >= 0"))
        if self.write_process and not sys.platform.startswith("linux"):
            # SOCK_SEQPACKET and SCM_RIGHTS, as the writer process uses them
            errors.append(("write_process", "needs Linux (use write_thread elsewhere)"))
        return errors
