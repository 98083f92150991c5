"""The plugin test kit (public API): test a tester-format plugin the way edgegw uses it.

Sans-IO checks, plain bytes in, ``AssertionError`` naming the chunking or cut out::

    from edgegw.formats import get_format
    from edgegw.testing import check_chunkings, check_truncations, parse

    fmt = get_format("myfmt")
    records = check_chunkings(fmt, SAMPLE)   # same records and offsets in every chunking;
                                             # ``position`` a record boundary throughout
    check_truncations(fmt, SAMPLE)           # close() at every cut: the records before it,
                                             # or FormatError inside a record
    parse(fmt, SAMPLE, chunks=[10, 3])       # the records, fed in those pieces

End to end, real sockets and a real spool, inside a Trio test::

    holds = await run_tail(tmp_path, "myfmt", SAMPLE)
    holds.lots["LOT42"]["die_count"], holds.test("LOT42", "idds")["max"]

A replaying source type (docs/plugins.md, "Writing a source type"), inside a Trio test::

    await check_replays(MySource, MySource.Config(...))  # JSON checkpoints; resumed from
                                                         # any, the records that followed
    await check_replays(my_source)  # an instance, run again at each start as the gateway
                                    # runs one an embedding program hands it

docs/plugins.md ("Testing a format", "Writing a source type") describes each check and
the rule behind it.
"""

from .parsing import (
    EXHAUSTIVE_BYTES,
    check_chunkings,
    check_truncations,
    chunkings,
    cut_points,
    parse,
    sampled_chunkings,
    sampled_cut_points,
)
from .sources import FOREIGN_CHECKPOINT, Put, check_replays, without_ts
from .tail import HubHolds, run_tail

__all__ = [
    "EXHAUSTIVE_BYTES",
    "FOREIGN_CHECKPOINT",
    "HubHolds",
    "Put",
    "check_chunkings",
    "check_replays",
    "check_truncations",
    "chunkings",
    "cut_points",
    "parse",
    "run_tail",
    "sampled_chunkings",
    "sampled_cut_points",
    "without_ts",
]
