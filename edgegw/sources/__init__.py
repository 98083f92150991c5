"""Sources: where records come from.

A source type is a class registered under the ``edgegw.sources`` entry-point group
(``edgegw.sim.source`` is the built-in example; STDF tail and MQTT are others).
It declares a ``Config`` dataclass for its own keys in a ``[[sources]]`` table, and an
``async def run(self, sink, *, task_status)`` that puts records into the sink in batches.

``sink.put`` is the only way records leave a source.  It awaits while the gateway is
full (backpressure: a tailed file simply waits, an MQTT socket stops being read); it
never drops.  A ``checkpoint`` passed with a batch is the source's resume position after
that batch; the gateway hands the last *durable* checkpoint back as
``context.checkpoint`` on the next start, so a restart neither re-reads nor skips.
A checkpoint travels with the frames: keep it small.  One larger than a quarter of what
a frame of the disk spool may hold (``spool.max_bytes / 16``), or one that would take all
sources' latest checkpoints together over half a segment, is refused, not stored
(``edgegw_gateway_checkpoints_rejected_total``; the records are stored, the previous
checkpoint stands: docs/spool.md, "Frame size"); the gateway's ``put`` then returns False
(True, or None from a sink that does not say, otherwise).

A source whose checkpoint is a *replay position* sets ``replays = True``: resuming from a
checkpoint, it emits exactly the records it emitted after it, in the same order (the STDF
tail and the simulated tester do).  The gateway relies on that to stay exact when one put
was split across frames and the gateway stopped between them: it drops the replayed
records that frames already hold (docs/spool.md, "Source positions and split puts").  A
source whose checkpoint is state rather than a position (or that has none) leaves it False.

Such a source should also tell a sink that takes it (``sink.takes_origin`` true; the
gateway's does) where each put's records come from: ``sink.put(records, checkpoint,
origin=(stream, start, end))`` -- an input read in order (the tail: a file's inode), the
position in it the records follow (its position in the checkpoint put last) and the position
after them (None: the stream ends there).  Values are JSON-able and compared by value; a
replay puts the same records with the same origins.  The drop then applies only to a replay
that resumes the same stream at the same position: a file deleted, replaced or truncated
meanwhile, or another one met first, loses nothing (docs/plugins.md, "Writing a source
type").  Without origins the drop applies to the first records replayed.  The positions
are those of the checkpoint a restart resumes from: after a put whose checkpoint was
refused (``put`` returned False), only that put's own stream moves on to where the put
ended; every other stream's next records still follow its position in the checkpoint
that stands (docs/spool.md, "A refused checkpoint").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol

import trio

from ..metrics import Metric, Metrics
from ..records import Record

ENTRY_POINT_GROUP = "edgegw.sources"


class RecordSink(Protocol):
    # Optional: ``takes_origin = True`` when ``put`` also takes ``origin=(stream, start,
    # end)`` (see above); a source passes ``origin`` only then.  Returns False when the
    # checkpoint was refused (see above); True or None otherwise.
    async def put(self, records: Sequence[Record], checkpoint: Any = None) -> bool | None: ...


@dataclasses.dataclass
class SourceContext:
    """What the gateway gives a source besides its config."""

    gateway_id: str
    metrics: Metrics
    checkpoint: Any = None  # last durable checkpoint of this source, or None
    state_dir: str | None = None  # a directory the source may keep files in


class Source(Protocol):
    Config: ClassVar[type]
    # Optional: ``replays: ClassVar[bool] = True`` when resuming from a checkpoint re-emits
    # exactly the records that followed it (see above); False when absent.

    def __init__(self, name: str, config: Any, context: SourceContext) -> None: ...

    async def run(
        self, sink: RecordSink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...


def source_errors(metrics: Metrics) -> Metric:
    """The gateway-wide count of bad input a source survived (corrupt files, undecodable
    payloads, read errors), by ``source`` and ``kind``: one metric for every source."""
    return metrics.counter("source_errors_total",
                           "bad input a source survived (corrupt files, undecodable payloads, "
                           "read errors), by source and kind")


class UnknownSourceType(LookupError):
    pass


def source_types() -> dict[str, type[Source]]:
    """Every installed source type, by name."""
    found: dict[str, type[Source]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found[ep.name] = ep.load()
        except Exception:  # a broken plugin must not take the gateway down
            continue
    return found


def source_type(name: str) -> type[Source]:
    types_ = source_types()
    try:
        return types_[name]
    except KeyError:
        raise UnknownSourceType(
            f"unknown source type {name!r} (installed: {', '.join(sorted(types_))})"
        ) from None


# after the interface above, which they import
from .copies import WAIT, Finished, Originals, read_gzip_heads  # noqa: E402
from .finished import FinishedFiles, recognised  # noqa: E402
from .formats import (  # noqa: E402
    UnknownFormat,
    build_options,
    get_format,
    installed_formats,
    is_complete,
    new_parser,
)
from .tail import TailConfig, TailSource  # noqa: E402
from .testerfile import open_shared, pread, pread_seek  # noqa: E402

__all__ = [
    "ENTRY_POINT_GROUP", "WAIT", "Finished", "FinishedFiles", "Originals", "RecordSink",
    "Source", "SourceContext", "TailConfig", "TailSource", "UnknownFormat",
    "UnknownSourceType", "build_options", "get_format", "installed_formats", "is_complete",
    "new_parser", "open_shared", "pread", "pread_seek", "read_gzip_heads", "recognised",
    "source_errors", "source_type", "source_types",
]
