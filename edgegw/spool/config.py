"""Configuration of the disk spool (the ``[spool]`` table of the gateway config)."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from ..config import Range


@dataclasses.dataclass(frozen=True)
class SpoolConfig:
    #: directory holding the segment files and the epoch file; created if missing.
    #: Empty: ``<gateway.state_dir>/spool``.
    dir: str = ""
    #: byte cap over all segment files; reaching it applies ``policy``
    max_bytes: Annotated[int, Range(16384)] = 1 << 30
    #: a segment is sealed (and a new one started) once it holds this many bytes; whole
    #: segments are the unit of deletion, so the cap must hold several of them
    segment_bytes: Annotated[int, Range(4096, 1 << 30)] = 16 << 20
    #: ``block``: append waits for room (the STDF tail simply waits, the tester's file is
    #: its own buffer); ``drop_oldest``: the oldest unacknowledged segment is dropped,
    #: counted and reported as a gateway event
    policy: Literal["block", "drop_oldest"] = "block"
    #: at most this many frames per group commit (one write + one fsync)
    commit_max_frames: Annotated[int, Range(1, 65536)] = 256
    #: extra time a commit may wait to gather more frames; 0 commits as soon as the
    #: previous fsync is done (frames arriving meanwhile form the next group)
    commit_max_delay_ms: Annotated[float, Range(0, 1000)] = 0.0
    #: health turns unhealthy when unacknowledged frames exist and nothing was
    #: acknowledged for this long
    stall_timeout_s: Annotated[float, Range(0.1, 86_400)] = 60.0

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.max_bytes < 4 * self.segment_bytes:
            problems.append(("max_bytes", f"must hold at least 4 segments: >= 4 x segment_bytes"
                                          f" = {4 * self.segment_bytes}"))
        return problems
