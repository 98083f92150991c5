"""The built-in simulated tester source: the tester model's events as records, in real time.

Used by ``edgegw demo``, the example configs and the tests; no files, no broker.  Like a
tester on a floor it tests lot after lot (``lots = 0``, the default: without end), 25
wafers each unless configured otherwise.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Annotated, ClassVar

import trio

from ..config import Range
from ..records import (
    LotEnd,
    LotStart,
    ParametricResult,
    PartResult,
    Record,
    WaferEnd,
    WaferStart,
)
from ..sources import RecordSink, SourceContext
from .tester import TesterModel, TesterProfile, lot_profiles

#: records one touchdown may make (see SimulatedConfig.validate)
MAX_TOUCHDOWN_RECORDS = 20_000


@dataclasses.dataclass(frozen=True)
class SimulatedConfig:
    parts_per_second: Annotated[float, Range(0.001, 1_000_000)] = 200.0
    sites: Annotated[int, Range(1, 255)] = 4
    wafers: Annotated[int, Range(1, 1_000_000)] = 25  # per lot
    lots: Annotated[int, Range(0)] = 0  # lots one after the other; 0 = without end
    wafer_diameter_dies: Annotated[int, Range(1, 1000)] = 20
    tests_per_part: Annotated[int, Range(1, 1000)] = 8
    base_yield: Annotated[float, Range(0, 1)] = 0.94
    seed: Annotated[int, Range()] = 1  # any integer
    lot_id: str = "LOT0001"  # the first lot's id; the next ones count up (LOT0002, ...)
    max_parts: Annotated[int, Range(0)] = 0  # 0 = no limit

    def validate(self) -> list[tuple[str, str]]:
        # numeric ranges are declared on the fields (Range) and checked by the loader
        problems = [("lot_id", "must not be empty")] if not self.lot_id else []
        per_touchdown = self.sites * (self.tests_per_part + 1)
        if per_touchdown > MAX_TOUCHDOWN_RECORDS:
            # one touchdown is one batch, made without a pause: bounded, so the gateway's
            # handshakes and heartbeats are never held up for long
            problems.append(("tests_per_part", (
                f"sites x (tests_per_part + 1) = {per_touchdown} records per touchdown; "
                f"at most {MAX_TOUCHDOWN_RECORDS}")))
        return problems


def simulated_batches(c: SimulatedConfig, source: str,
                      clock: Callable[[], float] = time.time) -> Iterator[tuple[list[Record], int]]:
    """The tester model's events as record batches, with the parts each batch completes
    (what paces the source): one batch per lot/wafer start and end, one per touchdown.
    Pure: the same config gives the same records, timestamps aside (``clock``)."""
    profile = TesterProfile(
        lot_id=c.lot_id, sites=c.sites, wafers=c.wafers,
        wafer_diameter_dies=c.wafer_diameter_dies, tests_per_part=c.tests_per_part,
        base_yield=c.base_yield, seed=c.seed)
    parts = 0
    for lot_profile in lot_profiles(profile, c.lots):
        lot = lot_profile.lot_id
        for ev in TesterModel(lot_profile).events():
            now = clock()
            if ev.kind == "lot_start":
                p = ev.data
                yield [LotStart(source, now, lot, p.part_type, p.node_name, p.tester_type,
                                p.job_name, int(now))], 0
            elif ev.kind == "wafer_start":
                yield [WaferStart(source, now, lot, ev.data, 1, int(now))], 0
            elif ev.kind == "touchdown":
                batch: list[Record] = []
                for part in ev.data:
                    for t in part.tests:
                        batch.append(ParametricResult(
                            source, now, lot, 1, part.site, part.part_id, t.test_num,
                            t.test_txt, t.value, t.lo, t.hi, t.units, t.passed))
                    batch.append(PartResult(
                        source, now, lot, part.wafer_id, 1, part.site, part.part_id, part.x,
                        part.y, part.hard_bin, part.soft_bin, part.passed, part.retest,
                        0x01 if part.retest else 0, part.test_time_ms, len(part.tests)))
                yield batch, len(ev.data)
                parts += len(ev.data)
                if c.max_parts and parts >= c.max_parts:
                    return
            elif ev.kind == "wafer_end":
                d = ev.data
                yield [WaferEnd(source, now, lot, d["wafer_id"], 1, int(now), d["parts"],
                                d["good"])], 0
            elif ev.kind == "lot_end":
                yield [LotEnd(source, now, lot, int(now))], 0


class SimulatedTesterSource:
    Config: ClassVar[type] = SimulatedConfig
    replays: ClassVar[bool] = True  # resuming from a checkpoint re-emits what followed it

    def __init__(self, name: str, config: SimulatedConfig, context: SourceContext) -> None:
        self.name = name
        self.config = config
        self.context = context
        self.produced = 0
        self.finished = trio.Event()
        self._stopping = False

    def stop(self) -> None:
        """Stop after the current batch (a clean stop: every counted record was put)."""
        self._stopping = True

    def batches(self) -> Iterator[tuple[list[Record], int]]:
        """What this source puts, batch by batch (``simulated_batches`` of its config)."""
        return simulated_batches(self.config, self.name)

    async def run(self, sink: RecordSink, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        interval = 1.0 / self.config.parts_per_second
        next_t = trio.current_time()
        # The model is seeded, so its batches are a deterministic sequence: the checkpoint
        # is the number of batches put, and a restart resumes after the last durable one
        # (neither re-sending nor skipping; the fault-injection tests rely on it).
        resume = self.context.checkpoint if isinstance(self.context.checkpoint, int) else 0
        for index, (batch, n_parts) in enumerate(self.batches()):
            if self._stopping:
                break
            if index < resume:
                continue
            await sink.put(batch, checkpoint=index + 1)
            self.produced += len(batch)
            if n_parts:
                next_t += interval * n_parts
                await trio.sleep_until(next_t)
        self.finished.set()
