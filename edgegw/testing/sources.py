"""A replaying source type checked the way the gateway relies on it (docs/plugins.md,
"Writing a source type"): its checkpoints are JSON and small enough to be told to the hub,
resumed from any of them it puts exactly the records that followed it, and a checkpoint it
never wrote is read as none.

``check_replays`` runs the source type in this process with a recording sink -- no
gateway, no sockets -- once from no checkpoint, then again from several of the checkpoints
that run put and from one it never wrote, and compares the records.  It raises
``AssertionError`` naming the put and the first record that differs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import cbor2
import trio

from ..metrics import Metrics
from ..protocol import MAX_POSITIONS_BYTES
from ..records import Record
from ..sources import SourceContext

#: the checkpoint the check hands a source as one it never wrote
FOREIGN_CHECKPOINT = {"edgegw.testing": "a checkpoint this source never wrote"}


@dataclasses.dataclass
class Put:
    """One ``sink.put`` the source made."""

    records: list[Record]
    checkpoint: Any
    origin: tuple[Any, Any, Any] | None = None


def without_ts(record: Record) -> Record:
    """What two runs' records are compared by unless told otherwise: the record with its
    ``ts`` (the time it was made, which a replay cannot repeat) set to 0."""
    return record._replace(ts=0.0)


class _Recorder:
    """A sink that keeps every put, and ends the run once it holds ``enough`` records or
    no put came for ``idle_s`` (a source waiting for input it will never get)."""

    takes_origin = True

    def __init__(self, scope: trio.CancelScope, enough: int, idle_s: float | None) -> None:
        self.scope = scope
        self.enough = enough
        self.idle_s = idle_s
        self.puts: list[Put] = []
        self.count = 0
        #: ends the idle watch: its deadline moves on with each put (none before the first)
        self.idle = trio.CancelScope()

    async def put(self, records: Sequence[Record], checkpoint: Any = None,
                  origin: tuple[Any, Any, Any] | None = None) -> bool:
        self.puts.append(Put(list(records), checkpoint, origin))
        self.count += len(records)
        if self.idle_s is not None:
            self.idle.deadline = trio.current_time() + self.idle_s
        if self.count >= self.enough:
            self.scope.cancel()
        await trio.lowlevel.checkpoint()
        return True

    async def watch_idle(self) -> None:
        if self.idle_s is None:
            return
        with self.idle:
            await trio.sleep_forever()
        self.scope.cancel()


@dataclasses.dataclass(frozen=True)
class _Runs:
    """How each run of the source type is made and bounded."""

    source: Any  # a source type, or an instance run again at each start
    config: Any
    name: str
    timeout_s: float
    state_dir: str | None

    def start(self, checkpoint: Any) -> Any:
        """The source as the gateway starts it from ``checkpoint``: a source type built
        anew from its config; an instance run again as it is, the checkpoint set in its
        ``SourceContext`` (docs/reliability.md, "source")."""
        if not isinstance(self.source, type):
            self.source.context.checkpoint = checkpoint
            return self.source
        context = SourceContext("edgegw-testing", Metrics(), checkpoint=checkpoint,
                                state_dir=self.state_dir)
        return self.source(self.name, self.config, context)

    async def run(self, checkpoint: Any, enough: int, idle_s: float | None,
                  what: str) -> list[Put]:
        source = self.start(checkpoint)
        failed: list[Exception] = []

        async def until_done(scope: trio.CancelScope, sink: _Recorder) -> None:
            try:
                with trio.move_on_after(self.timeout_s):
                    await source.run(sink)
            except Exception as exc:  # the source's own failure, told as the check's
                failed.append(exc)
            scope.cancel()  # returned (it has no more), failed or out of time

        with trio.CancelScope() as scope:
            sink = _Recorder(scope, enough, idle_s)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sink.watch_idle)
                nursery.start_soon(until_done, scope, sink)
        if failed:
            raise AssertionError(f"{what}: raised {failed[0]!r}") from failed[0]
        return sink.puts


def _check_checkpoint(checkpoint: Any, index: int) -> None:
    where = f"the checkpoint of put {index}"
    try:
        same = json.loads(json.dumps(checkpoint)) == checkpoint
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"{where} is not JSON ({exc}): {checkpoint!r:.200}") from exc
    if not same:
        raise AssertionError(f"{where} is not the same once through JSON (a tuple, a "
                             f"non-text key?): {checkpoint!r:.200}")
    size = len(cbor2.dumps(checkpoint))
    if size > MAX_POSITIONS_BYTES:
        raise AssertionError(f"{where} takes {size} bytes: over the {MAX_POSITIONS_BYTES} "
                             "that the sources' checkpoints may take together to be told "
                             "to the hub")


def _compare(got: list[Record], want: list[Record], same: Callable[[Record], Any],
             what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        if same(g) != same(w):
            raise AssertionError(f"{what}: record {i} after it differs: got {g!r:.300}, "
                                 f"want {w!r:.300}")
    if len(got) < len(want):
        raise AssertionError(f"{what}: put {len(got)} record(s) of the {len(want)} that "
                             "followed it")


def _same_origin(got: Any, want: tuple[Any, Any, Any], what: str) -> None:
    """A resumed source's first put comes from where the put that followed the checkpoint
    came from: the same stream, the same start (where the skip of replayed records looks)."""
    if got is None or list(got)[:2] != list(want)[:2]:
        raise AssertionError(f"{what}: its first put's origin is {got!r}, where the put "
                             f"that followed it came from {want!r} (stream and start)")


async def check_replays(source_type: Any, config: Any = None, *, name: str = "source",
                        records: int = 5000, restarts: int = 5, idle_s: float = 2.0,
                        timeout_s: float = 60.0, same: Callable[[Record], Any] = without_ts,
                        state_dir: str | None = None) -> list[Put]:
    """Check a replaying source type (``replays = True``); returns the first run's puts.
    ``source_type`` may also be a source *instance* (one an embedding program hands the
    gateway): it is run again at each start, as the gateway runs it, with the checkpoint
    set in its ``context`` (a ``SourceContext``) -- so it must read it in ``run``, not
    in ``__init__``; ``config``, ``name`` and ``state_dir`` are then not used.

    The first run, from no checkpoint, lasts until the source has put ``records`` records,
    returns, or puts nothing for ``idle_s`` (its input read to the end).  Each checkpoint
    it put must be JSON (the same value back) and at most ``MAX_POSITIONS_BYTES`` in CBOR.
    Then, from the checkpoints of up to ``restarts`` puts spread over that run, and from
    ``FOREIGN_CHECKPOINT`` (which it must read as none), a new instance must put the same
    records as followed that put (as followed no checkpoint), compared by ``same``
    (default: ``without_ts``), within ``timeout_s`` each.  ``config`` is the source type's
    own ``Config``; ``state_dir`` is handed to every instance."""
    kind = (source_type.__name__ if isinstance(source_type, type)
            else f"{type(source_type).__name__} (an instance)")
    if getattr(source_type, "replays", False) is not True:
        raise AssertionError(f"{kind} does not say replays = True: resumed "
                             "from a checkpoint it need not put the same records, and there "
                             "is nothing to check")
    if not (isinstance(source_type, type)
            or isinstance(getattr(source_type, "context", None), SourceContext)):
        raise AssertionError(f"{kind} has no SourceContext as its context: the gateway "
                             "hands an instance its checkpoint there")
    runs = _Runs(source_type, config, name, timeout_s, state_dir)
    first = await runs.run(None, records, idle_s, f"{kind}, from no checkpoint")
    if not first:
        raise AssertionError(f"{kind} put nothing in {timeout_s:g} s: "
                             "nothing to check")
    flat: list[Record] = []
    after: list[int] = []  # records put up to and including each put
    for i, p in enumerate(first):
        if p.checkpoint is not None:
            _check_checkpoint(p.checkpoint, i)
        flat.extend(p.records)
        after.append(len(flat))
    resumes = [i for i, p in enumerate(first) if p.checkpoint is not None]
    step = max(1, math.ceil(len(resumes) / max(1, restarts)))
    starts: list[tuple[Any, int, Put | None, str]] = [
        (json.loads(json.dumps(first[i].checkpoint)), after[i],
         first[i + 1] if i + 1 < len(first) else None,
         f"{kind}, resumed from the checkpoint of put {i} (after record {after[i]})")
        for i in resumes[::step][:restarts]]
    starts.append((FOREIGN_CHECKPOINT, 0, first[0], f"{kind}, started with a checkpoint it "
                   f"never wrote ({FOREIGN_CHECKPOINT!r}), which it must read as none"))
    for checkpoint, done, following, what in starts:
        want = flat[done:]
        if not want:
            continue
        puts = await runs.run(checkpoint, len(want), None, what)
        _compare([r for p in puts for r in p.records], want, same, what)
        if following is not None and following.origin is not None:
            _same_origin(puts[0].origin, following.origin, what)
    return first


__all__ = ["FOREIGN_CHECKPOINT", "Put", "check_replays", "without_ts"]
