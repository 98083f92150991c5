"""Configuration of the disk spool (the ``[spool]`` table of the gateway config)."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class SpoolConfig:
    #: directory holding the segment files and the epoch file; created if missing.
    #: Empty: ``<gateway.state_dir>/spool``.
    dir: str = ""
    #: byte cap over all segment files; reaching it applies ``policy``
    max_bytes: int = 1 << 30
    #: a segment is sealed (and a new one started) once it holds this many bytes; whole
    #: segments are the unit of deletion, so the cap must hold several of them
    segment_bytes: int = 16 << 20
    #: ``block``: append waits for room (the STDF tail simply waits, the tester's file is
    #: its own buffer); ``drop_oldest``: the oldest unacknowledged segment is dropped,
    #: counted and reported as a gateway event
    policy: Literal["block", "drop_oldest"] = "block"
    #: at most this many frames per group commit (one write + one fsync)
    commit_max_frames: int = 256
    #: extra time a commit may wait to gather more frames; 0 commits as soon as the
    #: previous fsync is done (frames arriving meanwhile form the next group)
    commit_max_delay_ms: float = 0.0
    #: health turns unhealthy when unacknowledged frames exist and nothing was
    #: acknowledged for this long
    stall_timeout_s: float = 60.0

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.segment_bytes < 4096:
            problems.append(("segment_bytes", "must be >= 4096"))
        if self.max_bytes < 4 * self.segment_bytes:
            problems.append(("max_bytes", "must hold at least 4 segments (4 x segment_bytes)"))
        if self.commit_max_frames < 1:
            problems.append(("commit_max_frames", "must be >= 1"))
        if self.commit_max_delay_ms < 0:
            problems.append(("commit_max_delay_ms", "must be >= 0"))
        if self.stall_timeout_s <= 0:
            problems.append(("stall_timeout_s", "must be > 0"))
        return problems
