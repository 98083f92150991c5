"""The built-in simulated tester source: the tester model's events as records, in real time.

Used by ``edgegw demo`` and the tests; no files, no broker.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar

import trio

from ..records import (
    LotEnd,
    LotStart,
    ParametricResult,
    PartResult,
    Record,
    WaferEnd,
    WaferStart,
)
from ..sim.tester import TesterModel, TesterProfile
from . import RecordSink, SourceContext


@dataclasses.dataclass(frozen=True)
class SimulatedConfig:
    parts_per_second: float = 200.0
    sites: int = 4
    wafers: int = 1000
    wafer_diameter_dies: int = 20
    tests_per_part: int = 8
    base_yield: float = 0.92
    seed: int = 1
    lot_id: str = "LOT0001"
    max_parts: int = 0  # 0 = no limit

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.parts_per_second <= 0:
            problems.append(("parts_per_second", "must be > 0"))
        if not 1 <= self.sites <= 255:
            problems.append(("sites", "must be between 1 and 255"))
        return problems


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

    def _records(self) -> Any:
        c = self.config
        model = TesterModel(TesterProfile(
            lot_id=c.lot_id, sites=c.sites, wafers=c.wafers,
            wafer_diameter_dies=c.wafer_diameter_dies, tests_per_part=c.tests_per_part,
            base_yield=c.base_yield, seed=c.seed))
        src = self.name
        lot = c.lot_id
        parts = 0
        for ev in model.events():
            now = time.time()
            if ev.kind == "lot_start":
                p = ev.data
                yield [LotStart(src, now, lot, p.part_type, p.node_name, p.tester_type,
                                p.job_name, int(now))], 0
            elif ev.kind == "wafer_start":
                yield [WaferStart(src, now, lot, ev.data, 1, int(now))], 0
            elif ev.kind == "touchdown":
                batch: list[Record] = []
                for part in ev.data:
                    for t in part.tests:
                        batch.append(ParametricResult(
                            src, now, lot, 1, part.site, part.part_id, t.test_num, t.test_txt,
                            t.value, t.lo, t.hi, t.units, t.passed))
                    batch.append(PartResult(
                        src, now, lot, part.wafer_id, 1, part.site, part.part_id, part.x,
                        part.y, part.hard_bin, part.soft_bin, part.passed, part.retest,
                        0x01 if part.retest else 0, part.test_time_ms, len(part.tests)))
                yield batch, len(ev.data)
                parts += len(ev.data)
                if c.max_parts and parts >= c.max_parts:
                    return
            elif ev.kind == "wafer_end":
                d = ev.data
                yield [WaferEnd(src, now, lot, d["wafer_id"], 1, int(now), d["parts"],
                                d["good"])], 0
            elif ev.kind == "lot_end":
                yield [LotEnd(src, now, lot, int(now))], 0

    async def run(self, sink: RecordSink, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        interval = 1.0 / self.config.parts_per_second
        next_t = trio.current_time()
        # The model is seeded, so its batches are a deterministic sequence: the checkpoint
        # is the number of batches put, and a restart resumes after the last durable one
        # (neither re-sending nor skipping; the fault-injection tests rely on it).
        resume = self.context.checkpoint if isinstance(self.context.checkpoint, int) else 0
        for index, (batch, n_parts) in enumerate(self._records()):
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
