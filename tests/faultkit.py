"""Fault-injection kit: real hub and gateway processes, a TCP proxy that cuts or black-holes
the link, and the record-by-record comparison of what the tester produced with what the
hub applied."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from ports import free_port
from processes import REPO, get_json, spawn, wait_for

from edgegw.hub.store import unpack_body
from edgegw.metrics import Metrics
from edgegw.protocol import decode_body
from edgegw.records import from_wire
from edgegw.sim import SimulatedConfig, SimulatedTesterSource
from edgegw.sources import SourceContext

GATEWAY = "ate-01"
TOKEN = "change-me-ate-01"
TIME_FIELDS = ("start_t", "finish_t")  # wall-clock fields: differ when regenerated


def normalise(record: Any) -> tuple[Any, ...]:
    """A record without its wall-clock fields (regenerated after a restart, they differ)."""
    cls = type(record)
    clock = _CLOCK_FIELDS.get(cls)
    if clock is None:
        clock = _CLOCK_FIELDS[cls] = frozenset(
            i for i, f in enumerate(cls._fields) if f == "ts" or f in TIME_FIELDS)
    # the same tuple as freezing every field of ``record._replace(ts=0, ...)``, without
    # the per-field calls for scalars (most fields): the fault tests compare 100k records
    return (cls.__name__, *[0 if i in clock else v if type(v) in _SCALARS else _frozen(v)
                            for i, v in enumerate(record)])


_CLOCK_FIELDS: dict[type, frozenset[int]] = {}
_SCALARS = frozenset({int, float, str, bool, bytes, type(None)})


def _frozen(value: Any) -> Any:
    """Hashable form (records may hold dicts and lists: ``extra``, multi-pin values)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def expected_records(**source: Any) -> list[tuple[Any, ...]]:
    """The seeded simulated tester's records (normalised), as an uninterrupted run makes."""
    return list(_expected(tuple(sorted(source.items()))))


@functools.cache  # a pure function of the config: several fault tests share one
def _expected(source: tuple[tuple[str, Any], ...]) -> tuple[tuple[Any, ...], ...]:
    cfg = SimulatedConfig(**dict(source))
    src = SimulatedTesterSource("tester", cfg, SourceContext(GATEWAY, Metrics()))
    return tuple(normalise(r) for batch, _ in src.batches() for r in batch)


def hub_records(hub_dir: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[int]]:
    """(tester records in record-id order, gateway event records, all record ids)."""
    db = sqlite3.connect(hub_dir / "hub.sqlite3")
    try:
        keys = db.execute("SELECT id, epoch, seq, first_rid, n_records FROM frames "
                          "WHERE gateway = ? ORDER BY first_rid", (GATEWAY,)).fetchall()
        decoded = _decoded.get(hub_dir)
        if decoded is None:
            _decoded.clear()  # one hub at a time: the previous test's is done with
            decoded = _decoded[hub_dir] = {}
        missing = [k for k in keys if k not in decoded]
        if missing:
            for *key, codec, body in db.execute(
                    "SELECT id, epoch, seq, first_rid, n_records, codec, body FROM frames "
                    "WHERE gateway = ? AND id >= ?", (GATEWAY, min(k[0] for k in missing))):
                if tuple(key) not in decoded:
                    decoded[tuple(key)] = _decode_frame(codec, body)
    finally:
        db.close()
    tester: list[tuple[int, tuple[Any, ...]]] = []
    events: list[tuple[Any, ...]] = []
    rids: list[int] = []
    for key in keys:
        frame_tester, frame_events, frame_rids = decoded[key]
        tester += frame_tester
        events += frame_events
        rids += frame_rids
    tester.sort()
    return [r for _, r in tester], events, rids


# A committed frame row never changes: each is decoded once, however often a test looks
# (keyed by id, epoch, seq, first_rid and n_records, so a reused row id is a new frame).
_decoded: dict[Path, dict[tuple[Any, ...], tuple[list[Any], list[Any], list[int]]]] = {}


def _decode_frame(codec: int, body: bytes) -> tuple[list[Any], list[Any], list[int]]:
    first_rid, sources, wire = decode_body(unpack_body(codec, body), 1 << 30)
    tester: list[tuple[int, tuple[Any, ...]]] = []
    events: list[tuple[Any, ...]] = []
    for i, item in enumerate(wire):
        rec = from_wire(item, sources)
        if rec.source == "tester":
            tester.append((first_rid + i, normalise(rec)))
        else:
            events.append(tuple(rec))
    return tester, events, list(range(first_rid, first_rid + len(wire)))


def report(**fields: Any) -> None:
    """Append one JSON line to ``$EDGEGW_FAULT_REPORT`` (scripts/fault-soak.sh sums them)."""
    path = os.environ.get("EDGEGW_FAULT_REPORT")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, **fields}) + "\n")


def assert_exactly_once(hub_dir: Path, expected: list[tuple[Any, ...]],
                        missing_ok: list[tuple[Any, ...]] | None = None) -> dict[str, int]:
    """Zero lost and zero duplicated: the hub's tester records, in record-id order, are the
    tester's records exactly (minus ``missing_ok``: records the gateway reported lost)."""
    got, _, rids = hub_records(hub_dir)
    dup_rids = [rid for rid, n in Counter(rids).items() if n > 1]
    counts = Counter(got)
    dups = [r for r, n in counts.items() if n > 1]
    want = expected
    if missing_ok:
        gone = Counter(missing_ok)
        want = []
        for r in expected:
            if gone[r]:
                gone[r] -= 1
            else:
                want.append(r)
    # lost: what the hub lacks of what it should have (the reported-lost records may hold
    # the gateway's own events too, which are not tester records: not a length difference)
    report(records=len(got), expected=len(expected),
           lost=sum((Counter(want) - counts).values()),
           reported_lost=len(missing_ok or ()),
           duplicated=sum(n - 1 for n in counts.values() if n > 1),
           duplicate_rids=len(dup_rids))
    assert not dup_rids, f"{len(dup_rids)} record ids applied twice, e.g. {dup_rids[:5]}"
    assert not dups, f"{len(dups)} records applied twice, e.g. {dups[:2]}"
    if got != want:
        lost = Counter(want) - Counter(got)
        extra = Counter(got) - Counter(want)
        raise AssertionError(f"hub has {len(got)} tester records, expected {len(want)}: "
                             f"{sum(lost.values())} lost (e.g. {list(lost)[:2]}), "
                             f"{sum(extra.values())} unexpected (e.g. {list(extra)[:2]})")
    return {"records": len(got)}


class _Process:
    """An edgegw process the test can kill (SIGKILL, no goodbye) or stop (SIGTERM)."""

    proc: subprocess.Popen[bytes] | None = None
    stop_timeout = 10.0

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wait_crashed(self, timeout: float = 60) -> None:
        """Until the process killed itself at its armed failpoint (SIGKILL, status -9)."""
        assert self.proc is not None
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the armed failpoint did not fire within {timeout} s") from None
        assert status == -9, f"exited with {status}, not by its failpoint's SIGKILL"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def stop_all(hub: _Process, *gateways: _Process) -> None:
    """Teardown: SIGTERM to the hub, then to the gateways (a gateway stopped while its hub
    is up ends when the hub answers its going-away close, one whose hub is paused after
    uplink.CLOSE_TIMEOUT_S)."""
    for p in (hub, *gateways):
        p.stop()


class Hub(_Process):
    def __init__(self, tmp: Path, port: int | None = None) -> None:
        self.tmp = tmp
        self.dir = tmp / "hub"
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, failpoints: str = "", wait: bool = True, *settings: str) -> Hub:
        """Start (``failpoints``: armed for this run, ``edgegw/failpoints.py``; ``wait``:
        until /healthz answers -- not for a run that may crash at its failpoint first;
        ``settings``: more ``--set key=value`` arguments)."""
        self.proc = spawn("hub", "--config", str(REPO / "conf" / "hub.toml"),
                          "--set", f"hub.port={self.port}", "--set", f"hub.data_dir={self.dir}",
                          "--set", "hub.heartbeat_s=1.0",
                          *[a for kv in settings for a in ("--set", kv)],
                          log=self.tmp / "hub.log",
                          env={"EDGEGW_FAILPOINTS": failpoints})
        if wait:
            wait_for(lambda: get_json(f"{self.url}/healthz")["status"] == "ok")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        return get_json(f"{self.url}/api/stats")["gateways"].get(GATEWAY, {})

    def metric(self, name: str, *labels: str) -> float:
        """The sum of ``name``'s samples on /metrics whose labels include every one of
        ``labels``."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=2) as r:
            lines = r.read().decode().splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines
                   if line.startswith((name + "{", name + " "))
                   and all(label in line for label in labels))


class Gateway(_Process):
    stop_timeout = 15.0  # the final flush and the spool's last commit
    #: where it runs (a command that runs it: ``spawn``) and its status port is reached
    prefix: tuple[str, ...] = ()
    status_host = "127.0.0.1"
    #: the config it runs with (``--set`` settings on top)
    config = REPO / "conf" / "gateway.toml"

    def __init__(self, tmp: Path, hub_port: int, *settings: str) -> None:
        self.tmp = tmp
        self.state = tmp / "gw"
        self.spool = tmp / "gw" / "spool"
        self.hub_port = hub_port
        self.settings = settings
        self.status = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, failpoints: str = "", wait: bool = True) -> Gateway:
        """Start (``failpoints``: armed for this run; ``wait``: until its status answers --
        not for a run that may crash at its failpoint before that)."""
        self.starts += 1
        self.proc = spawn(
            "gateway", "--config", str(self.config),
            "--set", f"gateway.hub_url=ws://127.0.0.1:{self.hub_port}/ws/gateway",
            "--set", f"gateway.state_dir={self.state}",
            "--set", f"gateway.status_port={self.status}",
            "--set", f"spool.dir={self.spool}",
            "--set", "uplink.backoff_initial_s=0.1", "--set", "uplink.backoff_max_s=1.0",
            "--set", "uplink.heartbeat_s=1.0", "--set", "uplink.connect_timeout_s=3.0",
            *self.settings, log=self.tmp / "gw.log", env={"EDGEGW_FAILPOINTS": failpoints},
            prefix=self.prefix)
        if wait:
            wait_for(lambda: self.stats())
        return self

    def stats(self) -> dict[str, Any]:
        return get_json(f"http://{self.status_host}:{self.status}/api/stats")



def source_settings(**source: Any) -> list[str]:
    out = []
    for k, v in source.items():
        out += ["--set", f"sources.0.{k}={v!r}" if isinstance(v, str) else
                f"sources.0.{k}={v}"]
    return out


def wait_all_applied(hub: Hub, gw: Gateway, n_expected: int, timeout: float = 60) -> None:
    """Until the source has finished and the spool holds nothing unacknowledged."""
    seen: dict[str, Any] = {}

    def done() -> bool:
        gw_stats = gw.stats()
        st = gw_stats["store"]
        seen.update(hub=hub.stats(), store=st, connected=gw_stats.get("connected"),
                    last_error=gw_stats.get("last_error"))
        if not (seen["hub"].get("records_applied", 0) >= n_expected
                and st["frames"] == 0 and st["pending_frames"] == 0
                and gw_stats["pending_in_batcher"] == 0):
            return False
        # records_applied also counts the source's sensor readings and the gateway's
        # events: it can reach n_expected while the last tester batch is still on its
        # way, so the tester records themselves are counted (only at the very end)
        return len(hub_records(hub.dir)[0]) >= n_expected
    try:
        wait_for(done, timeout=timeout, interval=0.1)
    except AssertionError as exc:  # say where it stood: a stall, or merely slow
        raise AssertionError(f"{exc}; expected {n_expected} records; last seen {seen}") from None


def all_arrive_once(hub: Hub, gw: Gateway, timeout: float = 120, **source: Any) -> None:
    """Until the seeded simulated tester ``source`` has sent everything (``wait_all_applied``),
    then: nothing recorded lost at the hub, every record there exactly once."""
    expected = expected_records(**source)
    wait_all_applied(hub, gw, len(expected), timeout=timeout)
    assert hub.stats()["frames_lost"] == 0
    assert_exactly_once(hub.dir, expected)


class Proxy:
    """A TCP proxy between gateway and hub that can cut the link (``drop``: connections are
    closed and new ones refused, as when the hub's host goes away) or black-hole it
    (``blackhole``: bytes vanish, nothing is closed, no FIN, no RST — as when a cable is
    pulled or a firewall drops packets)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.mode = "pass"
        self._lock = threading.Lock()
        self._pairs: list[dict[str, Any]] = []
        self._closed = False
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self.mode == "drop":
                client.close()
                continue
            pair: dict[str, Any] = {"client": client, "upstream": None, "hole": False}
            if self.mode == "blackhole":
                pair["hole"] = True  # accepted (SYN answered by the kernel), never forwarded
            else:
                try:
                    pair["upstream"] = socket.create_connection(("127.0.0.1", self.target))
                except OSError:
                    client.close()
                    continue
            with self._lock:
                self._pairs.append(pair)
            threading.Thread(target=self._pump, args=(pair, "client", "upstream"),
                             daemon=True).start()
            if pair["upstream"] is not None:
                threading.Thread(target=self._pump, args=(pair, "upstream", "client"),
                                 daemon=True).start()

    def _pump(self, pair: dict[str, Any], src: str, dst: str) -> None:
        try:
            while True:
                data = pair[src].recv(65536)
                if not data:
                    break
                if pair["hole"]:
                    continue  # swallowed
                pair[dst].sendall(data)
        except OSError:
            pass
        finally:
            if not pair["hole"]:
                self._close(pair)

    @staticmethod
    def _close(pair: dict[str, Any]) -> None:
        for key in ("client", "upstream"):
            s = pair[key]
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def drop(self) -> None:
        self.mode = "drop"
        self.listener.close()  # new connections are refused (RST to the SYN)
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for p in pairs:
            p["hole"] = False
            self._close(p)

    def blackhole(self) -> None:
        self.mode = "blackhole"
        with self._lock:
            for p in self._pairs:
                p["hole"] = True

    def restore(self) -> None:
        if self.mode == "drop":
            self.listener = socket.create_server(("127.0.0.1", self.port))
            threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()
        self.mode = "pass"

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for p in pairs:
            p["hole"] = False
            self._close(p)


def sleep_random(rng: Any, lo: float, hi: float) -> None:
    time.sleep(rng.uniform(lo, hi))
