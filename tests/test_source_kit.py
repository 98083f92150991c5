"""The plugin kit's check for replaying source types (``edgegw.testing.check_replays``,
docs/plugins.md "Writing a source type"): the gateway's own replaying sources pass it, and
each rule a source type can break -- a checkpoint that is not JSON, a resume that skips or
repeats a record, a checkpoint it never wrote taken for its own, an instance that reads its
checkpoint when built -- fails it with the put and the record named."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
from shared_data import GALAXY, METIS, stdf_path

from edgegw.metrics import Metrics
from edgegw.records import PartResult, Record
from edgegw.sim import SimulatedConfig, SimulatedTesterSource
from edgegw.sources import SourceContext, TailConfig, TailSource
from edgegw.testing import FOREIGN_CHECKPOINT, check_replays, without_ts


def without_times(record: Record) -> Record:
    """The simulated tester dates its lot and wafer starts and ends by the clock too."""
    times = {f: 0 for f in ("start_t", "finish_t") if f in record._fields}
    return without_ts(record)._replace(**times)


async def test_the_simulated_tester_passes() -> None:
    config = SimulatedConfig(parts_per_second=1_000_000, wafers=2, wafer_diameter_dies=6,
                             max_parts=200, seed=7)
    first = await check_replays(SimulatedTesterSource, config, same=without_times)
    assert sum(len(p.records) for p in first) > 200  # every part, with its tests
    assert [p.checkpoint for p in first] == list(range(1, len(first) + 1))


@pytest.mark.parametrize("name, records, parts", [
    (METIS, 5000, 22),  # two sites interleaved, read whole
    (GALAXY, 20000, None),  # big-endian, gzip: resumed inside the gzip stream
])
async def test_the_stdf_tail_passes_on_real_tester_files(tmp_path: Path, name: str,
                                                        records: int, parts: int | None) -> None:
    shutil.copy(stdf_path(name), tmp_path / name)
    # small reads: many puts, so resumes from checkpoints inside the file
    config = TailConfig(paths=[str(tmp_path)], poll_interval=0.01, read_size=4096)
    first = await check_replays(TailSource, config, records=records, restarts=4, idle_s=3.0)
    assert len(first) > 8 and all(p.origin is not None for p in first)
    put = [r for p in first for r in p.records]
    assert {type(r).__name__ for r in put} >= {"LotStart", "PartResult", "ParametricResult"}
    assert parts is None or sum(isinstance(r, PartResult) for r in put) == parts
    assert len(put) >= records if parts is None else len(put) < records


@dataclasses.dataclass(frozen=True)
class CountConfig:
    parts: int = 30
    skip_on_resume: int = 0  # a resume off by this many records
    short_on_resume: int = 0  # resumed, it stops this many records early
    checkpoint_as: str = "int"  # "int", "tuple", "set"
    foreign: str = "none"  # what a checkpoint it never wrote is taken for: "none", "crash"
    origin_on_resume: int = 0  # resumed, its puts' origins start this far from the truth


class Counting:
    """A source type that puts one part result per put, its checkpoint the count put."""

    Config: ClassVar[type] = CountConfig
    replays: ClassVar[bool] = True

    def __init__(self, name: str, config: CountConfig, context: SourceContext) -> None:
        self.name, self.config, self.context = name, config, context

    def resume_at(self) -> int:
        cp = self.context.checkpoint
        if cp is None:
            return 0
        if self.config.foreign == "crash":
            return int(cp[0] if isinstance(cp, list) else cp)
        if isinstance(cp, int):
            return cp + self.config.skip_on_resume
        return int(cp[0]) if isinstance(cp, list) else 0

    async def run(self, sink: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        end = self.config.parts - (self.config.short_on_resume if self.context.checkpoint
                                   is not None else 0)
        for n in range(self.resume_at(), end):
            part = PartResult(self.name, 0.0, "LOT", "W1", 1, 1, str(n), n, 0, 1, 1, True)
            checkpoint: Any = {"int": n + 1, "tuple": (n + 1,), "set": {n + 1}}[
                self.config.checkpoint_as]
            start = n + (self.config.origin_on_resume if self.context.checkpoint else 0)
            await sink.put([part], checkpoint, origin=("counter", start, n + 1))


async def test_a_source_type_that_obeys_the_rules_passes() -> None:
    first = await check_replays(Counting, CountConfig())
    assert [p.records[0].part_id for p in first] == [str(n) for n in range(30)]


@pytest.mark.parametrize("skip, got", [(1, "2"), (-1, "0")])
async def test_a_resume_that_skips_or_repeats_a_record_fails(skip: int, got: str) -> None:
    with pytest.raises(AssertionError) as err:
        await check_replays(Counting, CountConfig(skip_on_resume=skip))
    message = str(err.value)
    assert message.startswith("Counting, resumed from the checkpoint of put 0 (after record "
                              "1): record 0 after it differs: got PartResult(source='source'")
    assert f"part_id='{got}'" in message and "want PartResult(" in message
    assert message.split("want ")[1].count("part_id='1'") == 1


async def test_a_resume_that_ends_early_fails_naming_how_many_it_put() -> None:
    with pytest.raises(AssertionError, match=r"^Counting, resumed from the checkpoint of put 0 "
                       r"\(after record 1\): put 28 record\(s\) of the 29 that followed it$"):
        await check_replays(Counting, CountConfig(short_on_resume=1))


@pytest.mark.parametrize("kind, why", [
    ("tuple", r"the checkpoint of put 0 is not the same once through JSON"),
    ("set", r"the checkpoint of put 0 is not JSON \(Object of type set"),
])
async def test_a_checkpoint_that_is_not_json_fails(kind: str, why: str) -> None:
    with pytest.raises(AssertionError, match=why):
        await check_replays(Counting, CountConfig(checkpoint_as=kind))


async def test_a_checkpoint_it_never_wrote_must_be_read_as_none() -> None:
    with pytest.raises(AssertionError) as err:
        await check_replays(Counting, CountConfig(foreign="crash"))
    assert str(err.value).startswith(
        f"Counting, started with a checkpoint it never wrote ({FOREIGN_CHECKPOINT!r}), "
        "which it must read as none: raised TypeError(")


async def test_a_resume_whose_first_put_comes_from_elsewhere_fails() -> None:
    """The gateway drops the replayed records frames hold already only where a resumed
    put starts on the same stream at the same position (docs/plugins.md)."""
    with pytest.raises(AssertionError, match=r"^Counting, resumed from the checkpoint of put 0 "
                       r"\(after record 1\): its first put's origin is \('counter', 2, 2\), "
                       r"where the put that followed it came from \('counter', 1, 2\)"):
        await check_replays(Counting, CountConfig(origin_on_resume=1))


class ReadsItsCheckpointWhenBuilt(Counting):
    """Reads its checkpoint in ``__init__``: right for a source the gateway builds anew
    from its config at each start, wrong for one an embedding program hands it as an
    instance, which it runs again as it is (the checkpoint set in its context)."""

    def __init__(self, name: str, config: CountConfig, context: SourceContext) -> None:
        super().__init__(name, config, context)
        self.at = super().resume_at()

    def resume_at(self) -> int:
        return self.at


def instance(source_type: type, config: Any = None) -> Any:
    return source_type("source", config or CountConfig(), SourceContext("embedded", Metrics()))


async def test_an_instance_is_run_again_with_each_checkpoint_in_its_context() -> None:
    first = await check_replays(instance(Counting))
    assert [p.records[0].part_id for p in first] == [str(n) for n in range(30)]
    # the gateway's own replaying sources, given as instances, pass too
    config = SimulatedConfig(parts_per_second=1_000_000, wafers=2, wafer_diameter_dies=6,
                             max_parts=200, seed=7)
    await check_replays(instance(SimulatedTesterSource, config), same=without_times)


async def test_an_instance_that_reads_its_checkpoint_when_built_fails() -> None:
    await check_replays(ReadsItsCheckpointWhenBuilt, CountConfig())  # as a type: built anew
    with pytest.raises(AssertionError, match=(
            r"^ReadsItsCheckpointWhenBuilt \(an instance\), resumed from the checkpoint of "
            r"put 0 \(after record 1\): record 0 after it differs: got PartResult\(.*"
            r"part_id='0'")):
        await check_replays(instance(ReadsItsCheckpointWhenBuilt))


async def test_an_instance_without_a_source_context_is_not_checked() -> None:
    source = instance(Counting)
    source.context = {"checkpoint": None}
    with pytest.raises(AssertionError, match=r"^Counting \(an instance\) has no SourceContext"):
        await check_replays(source)


async def test_a_source_type_that_does_not_replay_is_not_checked() -> None:
    class Live(Counting):
        replays: ClassVar[bool] = False

    with pytest.raises(AssertionError, match="does not say replays = True"):
        await check_replays(Live, CountConfig())
