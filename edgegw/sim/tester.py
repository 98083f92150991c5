"""A seeded model of a multi-site wafer-sort tester, sans-IO.

``TesterModel.touchdowns()`` yields, touchdown by touchdown, what a tester does: lot and
wafer starts, the parts of each site (with their parametric tests) and the summaries at
wafer and lot end.  It produces *events* in tester terms; the built-in simulated source
turns them into edgegw records directly, and the STDF simulator writes them as STDF.

Realism that matters to a live monitor: a controlled base yield, an edge ring that fails
more, one weak site, retests of a few failed dies (marked as superseding the first result),
and the way a production line actually moves.  Wafer yield wanders within a narrow band
from wafer to wafer (a mean-reverting walk, never a ramp), a parametric mean wanders the
same way (what a control chart shows), and now and then one wafer is an *excursion*: a
probe-card contact problem that fails a share of its dies at continuity (soft bin 30).  So
a yield alert set below the band fires on excursions, not on every wafer, and a tester can
run lot after lot for months without drifting to 0 %.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class TesterProfile:
    __test__ = False  # not a pytest test class despite the name

    lot_id: str = "LOT0001"
    part_type: str = "EDGE-SIM-1"
    node_name: str = "ate-sim"
    tester_type: str = "SIM-4000"
    job_name: str = "sim_sort.prg"
    sites: int = 4
    wafers: int = 1
    wafer_diameter_dies: int = 20
    tests_per_part: int = 8
    base_yield: float = 0.94
    edge_ring_yield: float = 0.85
    weak_site: int | None = 1
    weak_site_penalty: float = 0.04
    #: IDD_STATIC's mean wanders by this share of its nominal per wafer, pulled back
    #: towards nominal (mean-reverting: it stays within a band however long the run)
    drift_per_wafer: float = 0.02
    #: wafer-to-wafer yield wander (standard deviation of the wafer's yield shift)
    yield_wander: float = 0.01
    #: share of wafers that are excursions, and the share of dies an excursion fails
    excursion_rate: float = 0.04
    excursion_loss: float = 0.3
    retest_fraction: float = 0.03
    seed: int = 1


@dataclasses.dataclass
class TestResult:
    test_num: int
    test_txt: str
    value: float
    lo: float
    hi: float
    units: str
    passed: bool


@dataclasses.dataclass
class Part:
    wafer_id: str
    site: int
    part_id: str
    x: int
    y: int
    hard_bin: int
    soft_bin: int
    passed: bool
    retest: bool
    test_time_ms: int
    tests: list[TestResult]


@dataclasses.dataclass
class Event:
    kind: str  # lot_start, wafer_start, touchdown, wafer_end, lot_end
    data: Any = None


SOFT_BINS = {1: "PASS", 2: "PASS_SLOW", 10: "FAIL_IDD", 11: "FAIL_VTH", 12: "FAIL_LEAK",
             20: "FAIL_FUNC", 30: "FAIL_CONT"}
HARD_OF_SOFT = {1: 1, 2: 1, 10: 3, 11: 3, 12: 4, 20: 5, 30: 6}
TESTS = [
    (100, "IDD_STATIC", "uA", 5.0, 45.0, 25.0, 3.0),
    (110, "VTH_N", "V", 0.35, 0.55, 0.45, 0.02),
    (120, "VTH_P", "V", -0.55, -0.35, -0.45, 0.02),
    (130, "ILEAK_IN", "nA", -50.0, 50.0, 0.0, 8.0),
    (140, "VOH", "V", 2.9, 3.4, 3.15, 0.05),
    (150, "VOL", "V", 0.0, 0.4, 0.18, 0.04),
    (160, "FMAX", "MHz", 800.0, 1400.0, 1100.0, 60.0),
    (170, "IDD_DYN", "mA", 10.0, 60.0, 35.0, 4.0),
]


MAX_TESTS = 2000


def program_tests(n: int) -> list[tuple[int, str, str, float, float, float, float]]:
    """The first ``n`` tests of the program: the eight named ones, then (for realistic
    test counts; real programs run tens to hundreds of tests per part) generated
    parametric tests 1000, 1001, ... around 1.0 V with limits at +-5 sigma."""
    out = TESTS[:n]
    for i in range(max(0, n - len(TESTS))):
        mean = 1.0 + (i % 17) * 0.1
        sigma = mean * 0.01
        out.append((1000 + i, f"PARAM_{1000 + i}", "V", mean - 5 * sigma, mean + 5 * sigma,
                    mean, sigma))
    return out


def next_lot_id(lot_id: str, n: int) -> str:
    """The id of the n-th lot after ``lot_id``: LOT0001 -> LOT0002; no digits -> LOT-2."""
    if n == 0:
        return lot_id
    m = re.search(r"(\d+)$", lot_id)
    if not m:
        return f"{lot_id}-{n + 1}"
    digits = m.group(1)
    return lot_id[: m.start()] + str(int(digits) + n).zfill(len(digits))


def lot_profiles(profile: TesterProfile, lots: int = 1) -> Iterator[TesterProfile]:
    """The profiles of ``lots`` lots tested one after the other (0: without end).  Lot n
    uses lot id ``next_lot_id(profile.lot_id, n)`` and seed ``profile.seed + n``."""
    n = 0
    while not lots or n < lots:
        yield dataclasses.replace(profile, lot_id=next_lot_id(profile.lot_id, n),
                                  seed=profile.seed + n)
        n += 1


#: how strongly a wafer's yield shift and parametric wander are pulled back per wafer
REVERSION = 0.3
#: continuity tests an excursion fails (VOH, VOL: soft bin 30)
CONTACT_TESTS = (140, 150)


class TesterModel:
    __test__ = False  # not a pytest test class despite the name

    def __init__(self, profile: TesterProfile | None = None) -> None:
        self.profile = profile or TesterProfile()
        self.rng = random.Random(self.profile.seed)
        self.tests = program_tests(self.profile.tests_per_part)
        self.yield_shift = 0.0  # this wafer's yield offset from the profile's
        self.idd_shift = 0.0  # IDD_STATIC's mean offset, as a share of nominal
        self.excursion = 0.0  # this wafer's extra contact-fail probability

    def _next_wafer(self) -> None:
        p = self.profile
        keep = 1 - REVERSION
        self.yield_shift = keep * self.yield_shift + self.rng.gauss(0, p.yield_wander)
        self.idd_shift = keep * self.idd_shift + self.rng.gauss(0, p.drift_per_wafer)
        excursion = self.rng.random() < p.excursion_rate
        self.excursion = p.excursion_loss * self.rng.uniform(0.6, 1.4) if excursion else 0.0

    def dies(self) -> list[tuple[int, int]]:
        """Die coordinates of a round wafer, in prober stepping order (serpentine rows)."""
        d = self.profile.wafer_diameter_dies
        r = d / 2
        out: list[tuple[int, int]] = []
        for y in range(d):
            row = [x for x in range(d) if math.hypot(x + 0.5 - r, y + 0.5 - r) <= r]
            out.extend((x, y) for x in (row if y % 2 == 0 else reversed(row)))
        return out

    def _is_edge(self, x: int, y: int) -> bool:
        r = self.profile.wafer_diameter_dies / 2
        return math.hypot(x + 0.5 - r, y + 0.5 - r) > r - 1.5

    def _test_part(self, wafer_no: int, site: int, x: int, y: int) -> tuple[list[TestResult], int]:
        p = self.profile
        good = p.base_yield
        if self._is_edge(x, y):
            good = min(good, p.edge_ring_yield)
        if p.weak_site is not None and site == p.weak_site:
            good -= p.weak_site_penalty
        good += self.yield_shift
        fail = self.rng.random() > good
        fail_test = self.rng.randrange(len(self.tests)) if fail else -1
        if not fail and self.excursion and self.rng.random() < self.excursion:
            contact = [i for i, t in enumerate(self.tests) if t[0] in CONTACT_TESTS]
            fail_test = self.rng.choice(contact) if contact else self.rng.randrange(len(self.tests))
        results = []
        for i, (num, txt, units, lo, hi, mean, sigma) in enumerate(self.tests):
            drift = mean * self.idd_shift if num == 100 else 0.0
            value = self.rng.gauss(mean + drift, sigma)
            if i == fail_test:
                value = hi + abs(hi - lo) * (0.05 + self.rng.random() * 0.2)
            passed = lo <= value <= hi
            results.append(TestResult(num, txt, value, lo, hi, units, passed))
        soft = 1
        for r in results:
            if not r.passed:
                soft = {100: 10, 170: 10, 110: 11, 120: 11, 130: 12, 160: 20}.get(r.test_num, 30)
                break
        if soft == 1 and self.rng.random() < 0.05:
            soft = 2
        return results, soft

    def events(self) -> Iterator[Event]:
        """Every tester event of the lot, in order; a touchdown carries one part per site."""
        p = self.profile
        yield Event("lot_start", p)
        part_no = 0
        for w in range(p.wafers):
            wafer_id = f"{p.lot_id}-W{w + 1:02d}"
            self._next_wafer()
            yield Event("wafer_start", wafer_id)
            dies = self.dies()
            retests: list[tuple[int, int]] = []
            counts = {"parts": 0, "good": 0}
            for i in range(0, len(dies), p.sites):
                group = dies[i : i + p.sites]
                yield Event("touchdown", self._touchdown(w, wafer_id, group, counts, retests,
                                                           part_no, False))
                part_no += len(group)
            for i in range(0, len(retests), p.sites):
                group = retests[i : i + p.sites]
                yield Event("touchdown", self._touchdown(w, wafer_id, group, counts, [],
                                                           part_no, True))
                part_no += len(group)
            yield Event("wafer_end", {"wafer_id": wafer_id, **counts})
        yield Event("lot_end", p)

    def _touchdown(self, w: int, wafer_id: str, group: list[tuple[int, int]],
                   counts: dict[str, int], retests: list[tuple[int, int]], part_no: int,
                   is_retest: bool) -> list[Part]:
        parts = []
        for site, (x, y) in enumerate(group):
            tests, soft = self._test_part(w, site, x, y)
            passed = soft in (1, 2)
            parts.append(Part(wafer_id, site, str(part_no + site + 1), x, y,
                              HARD_OF_SOFT[soft], soft, passed, is_retest,
                              int(self.rng.uniform(80, 160)), tests))
            if not is_retest:
                counts["parts"] += 1
                counts["good"] += passed
                if not passed and self.rng.random() < self.profile.retest_fraction:
                    retests.append((x, y))
            elif passed:
                counts["good"] += 1  # a retest that passes turns a failed die good
        return parts


__all__ = [
    "HARD_OF_SOFT",
    "MAX_TESTS",
    "SOFT_BINS",
    "TESTS",
    "Event",
    "Part",
    "TestResult",
    "TesterModel",
    "TesterProfile",
    "lot_profiles",
    "program_tests",
]
