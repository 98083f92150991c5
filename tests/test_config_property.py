"""Config validation cannot lie: what check-config accepts runs, what it rejects is named.

Configs are generated from the schema itself -- ``edgegw.config.iter_keys`` over the hub
and gateway config dataclasses and the simulated source's, with each number's declared
``Range`` -- never from a hand-written copy of it.  Each key is left out (its default), or
set to a value at an end of its range (or its special value, 0 = off), inside it, or just
beyond it (or not finite, or of the wrong type).  Then, for the pair of configs:

- if ``check-config``'s checks accept both, a hub (in a thread of its own, as it runs in a
  process of its own) and a gateway start in this process, one frame passes from the
  gateway to the hub and is acknowledged, and both stop cleanly;
- otherwise every error line names a real key: one the example set, or one in the same
  table (a check between two keys), or one whose message names a key the example set (a
  check across tables); and every value set beyond its range is named by its own key.

Keys that say where things are on this machine (addresses, ports, directories, ids,
tokens) are pinned to what the test provides; their checks are tested in test_config.py
and test_startup_errors.py.

Bounded time, fixed seed (``derandomize``: the suite runs the same examples every time, so
a larger default adds no exploration across runs, only time): ``EDGEGW_CONFIG_EXAMPLES``
sets the number of examples (default 100, about 15 s; 9 in 10 are rejected, each accepted
pair takes ~2 s) for a longer run, e.g. ``EDGEGW_CONFIG_EXAMPLES=3000``;
``EDGEGW_CONFIG_SHRINK=1`` shrinks a failure to a small config (slow: it restarts services).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import threading
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import trio
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from ports import free_port

from edgegw.commands import check_config
from edgegw.config import INT64, ConfigError, Key, Range, iter_keys
from edgegw.gateway import Gateway, GatewayConfig
from edgegw.hub import Hub, HubConfig
from edgegw.records import GatewayEvent
from edgegw.sim import SimulatedConfig

EXAMPLES = int(os.environ.get("EDGEGW_CONFIG_EXAMPLES", "100"))
# shrinking a failure restarts services hundreds of times: on request only
PHASES = [Phase.explicit, Phase.generate] + [Phase.shrink] * bool(os.environ.get(
    "EDGEGW_CONFIG_SHRINK"))
TOKEN = "s3cret"
#: how long one accepted pair may take to start, pass a frame and stop, at most (a busy
#: machine, the largest simulated touchdown, restarts after timing failures)
RUN_TIMEOUT_S = 120

# Where things are on this machine: the test's own values (callables get the example's
# directory).  A key listed here is never generated.
PINNED: dict[str, Any] = {
    "hub.listen": "127.0.0.1",
    "hub.port": 0,
    "hub.data_dir": lambda d: str(d / "hub"),
    "gateways.<name>.token": TOKEN,
    "alerts.rules[].name": "rule-1",
    "alerts.webhooks[].url": "http://127.0.0.1:9/hook",  # discard port: deliveries fail
    "gateway.id": "ate-01",
    "gateway.token": TOKEN,
    "gateway.hub_url": "ws://127.0.0.1:1/ws/gateway",  # the hub's real port once it runs
    "gateway.state_dir": lambda d: str(d / "gw"),
    "gateway.status_listen": "127.0.0.1",
    "spool.dir": "",  # <state_dir>/spool
    "uplink.ca_file": "",
    "sources[0].lot_id": "LOT-P",
    # one touchdown, then the source is done: the frame the test waits for is not
    # racing an endless stream
    "sources[0].max_parts": 1,
}
#: the status port is "0 (off)" or a port that is free now
STATUS_PORT = "gateway.status_port"
#: the list of [[sources]] tables: generated from the simulated source's own schema
SKIP = {"sources"}

OPTIONAL_TABLES = ("spool.",)  # present or absent as a whole
LIST_TABLES = ("alerts.rules[].", "alerts.webhooks[].")  # none or one item


@dataclasses.dataclass
class Example:
    data: dict[str, Any]
    touched: set[str]  # dotted paths of the keys set (pinned ones excluded)
    beyond: set[str]  # ... of those set to a value outside what they accept


def _ends(rng: Range, base: type) -> list[Any]:
    """Accepted values at the range's ends (and its special value)."""
    lo = rng.lo if rng.lo is not None else INT64[0]
    hi = rng.hi if rng.hi is not None else INT64[1]
    if base is int:
        out = [int(lo) + 1 if rng.lo_open else int(lo), int(hi)]
    else:
        lo_f = math.nextafter(float(lo), math.inf) if rng.lo_open else float(lo)
        out = [lo_f, float(hi) if rng.hi is not None else 1e300]
    if rng.also is not None:
        out.append(base(rng.also))
    return out


def _beyond(rng: Range, base: type) -> list[Any]:
    """Values just outside the range (never its special value)."""
    out: list[Any] = []
    if rng.lo is not None:
        below = (rng.lo if rng.lo_open else
                 (int(rng.lo) - 1 if base is int else math.nextafter(float(rng.lo), -math.inf)))
        if below != rng.also:
            out.append(base(below))
    if rng.hi is not None:
        out.append(int(rng.hi) + 1 if base is int else math.nextafter(float(rng.hi), math.inf))
    else:
        out.append(INT64[1] + 1 if base is int else math.inf)
    if base is float:
        out += [math.nan, -math.inf]
    return out


def _number(draw: Any, tp: Any, beyond: bool) -> Any:
    """A value for a number-typed ``tp`` (Optional or not, with a Range or not)."""
    key = Key("", tp, None)
    base, rng = key.base, key.range or Range()
    if beyond:
        return draw(st.sampled_from([*_beyond(rng, base), "12"]))  # "12": a string
    inside: st.SearchStrategy[Any]
    lo = rng.lo if rng.lo is not None else INT64[0]
    hi = rng.hi if rng.hi is not None else INT64[1]
    if base is int:
        inside = st.integers(int(lo) + int(rng.lo_open), int(hi))
    else:
        inside = st.floats(float(lo), float(hi) if rng.hi is not None else 1e300,
                           exclude_min=rng.lo_open, allow_nan=False, allow_infinity=False)
    return draw(st.one_of(st.sampled_from(_ends(rng, base)), inside))


def _value(draw: Any, key: Key, beyond: bool) -> Any:
    """A value for ``key``: accepted by its type (``beyond``: not accepted)."""
    base = key.base
    origin = get_origin(base)
    if base in (int, float):
        return _number(draw, key.type, beyond)
    if base is bool:
        return "yes" if beyond else draw(st.booleans())
    if origin is Literal:
        return "no-such-choice" if beyond else draw(st.sampled_from(get_args(base)))
    if origin is list:
        item = get_args(base)[0]
        item_base = Key("", item, None).base
        if item_base in (int, float):
            if beyond:
                return [_number(draw, item, True)]
            return [_number(draw, item, False) for _ in range(draw(st.integers(0, 2)))]
        if get_origin(item_base) is Literal:
            choices = list(get_args(item_base))
            return ["no-such-choice"] if beyond else draw(
                st.lists(st.sampled_from(choices), max_size=len(choices), unique=True))
        if key.path.endswith("events"):  # webhook events: a list of known names
            names = ["raised", "acknowledged", "escalated"]
            return ["no-such-event"] if beyond else draw(
                st.lists(st.sampled_from(names), max_size=3, unique=True))
        return [3] if beyond else list(key.default)
    if origin is tuple:  # live.event_prefixes
        return [3] if beyond else draw(st.lists(st.sampled_from(["alert/", "gw/", ""]),
                                               max_size=3))
    if origin is dict:
        return {"X-Test": 1} if beyond else draw(st.sampled_from([{}, {"X-Test": "1"}]))
    if base is str:  # a string not pinned keeps its default
        return key.default
    raise AssertionError(f"no generator for {key.path}: {key.type}")


def _can_be_beyond(key: Key) -> bool:
    """Strings are the pinned keys' or their defaults: only typed values go beyond."""
    return key.base is not str


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    """``a.b[0].c`` -> data["a"]["b"][0]["c"] = value, creating tables on the way."""
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    node: Any = data
    for part, nxt in itertools.pairwise(parts):
        if part.startswith("["):
            node = node[int(part[1:-1])]
            continue
        if nxt.startswith("["):
            node = node.setdefault(part, [{}])
        else:
            node = node.setdefault(part, {})
    node[parts[-1]] = value


@st.composite
def examples(draw: Any, schema: list[tuple[str, type]], root: Path) -> Example:
    """A config from the schema: ``schema`` is [(path prefix, config dataclass)]."""
    data: dict[str, Any] = {}
    touched: set[str] = set()
    beyond: set[str] = set()
    keys = [k for prefix, cls in schema for k in iter_keys(cls, prefix)]
    with_optional = {t: draw(st.booleans()) for t in OPTIONAL_TABLES + LIST_TABLES}
    settable = []
    for key in keys:
        table = next((t for t in with_optional if key.path.startswith(t)), None)
        if table is not None and not with_optional[table]:
            continue
        if key.path in SKIP:
            continue
        path = key.path.replace("[]", "[0]")
        pin = PINNED.get(key.path, PINNED.get(path))
        required = key.default is dataclasses.MISSING
        if pin is not None:
            _set(data, path.replace(".<name>", ".ate-01"), pin(root) if callable(pin) else pin)
        elif key.path == STATUS_PORT:
            if draw(st.booleans()):
                _set(data, path, free_port())
        elif required and get_origin(key.base) is not Literal:
            raise AssertionError(f"required key without a pin: {key.path}")
        elif required or draw(st.integers(0, 2)) > 0:  # a third are left at their default
            settable.append((key, path))
    # at most two keys beyond their range; most examples have none
    n_beyond = draw(st.sampled_from([0, 0, 0, 0, 1, 2]))
    candidates = [i for i, (k, _) in enumerate(settable) if _can_be_beyond(k)]
    bad = set(draw(st.lists(st.sampled_from(candidates), max_size=n_beyond, unique=True))
              if candidates and n_beyond else [])
    for i, (key, path) in enumerate(settable):
        _set(data, path, _value(draw, key, i in bad))
        touched.add(path)
        if i in bad:
            beyond.add(path)
    if with_optional["spool."] and any(k.path.startswith("spool.") for k in keys):
        data.setdefault("spool", {})  # [spool] present, every key at its default
    return Example(data, touched, beyond)


def verdict(data: dict[str, Any]) -> list[str]:
    """check-config's errors for ``data`` ([] = accepted)."""
    try:
        check_config(data, "gen.toml")
    except ConfigError as exc:
        return exc.errors
    return []


def check_rejection(errors: list[str], ex: Example, schema_keys: set[str]) -> None:
    named = set()
    for line in errors:
        origin, key, message = line.split(": ", 2)
        assert origin == "gen.toml" and message, line
        item = re.sub(r"(\[\d+\])+$", "", key)  # bins[1] -> bins: the list's own key
        generic = re.sub(r"\[\d+\]", "[]", item).replace(".ate-01.", ".<name>.")
        if generic not in schema_keys and generic.rsplit(".", 1)[0] in schema_keys:
            item, generic = item.rsplit(".", 1)[0], generic.rsplit(".", 1)[0]  # headers.X
        assert generic in schema_keys, f"not a key of the schema: {line}"
        # the key itself, one in the same table (a check between two keys), or a key the
        # message names (a check across tables)
        table = item.rsplit(".", 1)[0] if "." in item else ""
        assert item in ex.touched or any(
            t.rsplit(".", 1)[0] == table or re.sub(r"\[\d+\]", "", t) in message
            for t in ex.touched), f"names nothing the example set: {line}"
        named.add(item)
    assert ex.beyond <= named, f"values beyond their range not named: {ex.beyond - named}"


class HubThread:
    """A hub on its own Trio loop in a thread, as it would be in a process of its own: a
    busy gateway in this loop cannot starve the hub's handshake timeouts."""

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.app: Hub | None = None
        self.port: int | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self.app = Hub(self.config)
            async with trio.open_nursery() as nursery:
                self.port = await nursery.start(self.app.run)
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()

        try:
            trio.run(main)
        except BaseException as exc:
            self.error = exc
        finally:
            self._ready.set()

    def start(self) -> int:
        self._thread.start()
        self._ready.wait(RUN_TIMEOUT_S)
        if self.error is not None:
            raise self.error
        assert self.port is not None, "the hub did not start"
        return self.port

    def stop(self) -> None:
        if self._token is not None and self._stop is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(RUN_TIMEOUT_S)
        assert not self._thread.is_alive(), "the hub did not stop"
        if self.error is not None:
            raise self.error


#: link failures that come from the machine's timing, not from the config: a HELLO or
#: heartbeat that came too late (4007, 4005), a connect or a readiness probe that timed out
TIMING_FAILURES = ("code=4007", "code=4005", "TooSlowError", "ConnectionTimeout",
                   "no connection within")
ATTEMPTS = 3


def run_pair(hub_cfg: HubConfig, gw_data: dict[str, Any]) -> int:
    """Start both, pass one frame, stop both; AssertionError or the services' own error
    when any step fails.  Returns how many times the gateway was restarted.

    Timeouts and heartbeats may be as short as 1 s, and this machine is shared: when the
    link fails on one of those, the gateway may then back off for up to an hour (as
    configured).  A restarted gateway tries again at once; a config that breaks the link
    every time still fails after three attempts."""
    hub = HubThread(hub_cfg)
    port = hub.start()
    try:
        gw_data["gateway"]["hub_url"] = f"ws://127.0.0.1:{port}/ws/gateway"
        gw_cfg = check_config(gw_data, "gen.toml")
        assert isinstance(gw_cfg, GatewayConfig)

        async def first_frame_passed(gw: Gateway) -> bool:
            # the hub applied a frame and the gateway saw its first frame acknowledged;
            # not every frame: at a valid but slow setting (one record per frame, each
            # waiting spool.commit_max_delay_ms) a large touchdown takes minutes
            assert hub.app is not None
            with trio.move_on_after(RUN_TIMEOUT_S / (2 * ATTEMPTS)):
                while not (hub.app.ingest.m_frames.total() >= 1  # polled: the hub is in a thread
                           and gw.store.first_unacked > 1):
                    await trio.sleep(0.02)
                return True
            return False

        async def attempt() -> str | None:
            """None when a frame passed, else the link's last error."""
            async with trio.open_nursery() as nursery:
                gw = Gateway(gw_cfg)
                await nursery.start(gw.run)

                async def probe() -> None:
                    # a record of its own, and the batch cut now: batch.max_delay_ms may
                    # hold the first records for up to a minute, as configured
                    await gw.sink.put([GatewayEvent("property", 0.0, "info", "probe",
                                                    "one frame", None)])
                    await gw.flush()

                nursery.start_soon(probe)
                passed = await first_frame_passed(gw)
                nursery.cancel_scope.cancel()
            return None if passed else str(gw.stats()["last_error"])

        async def gateway_main() -> int:
            with trio.fail_after(RUN_TIMEOUT_S):
                for restarts in range(ATTEMPTS):
                    error = await attempt()
                    if error is None:
                        return restarts
                    assert any(t in error for t in TIMING_FAILURES), (
                        f"frames not acknowledged: {error}")
            raise AssertionError(f"the link failed {ATTEMPTS} times in a row: {error}")

        restarts = trio.run(gateway_main)
        assert hub.app is not None and hub.app.ingest.m_frames.total() >= 1
        return restarts
    finally:
        hub.stop()


HUB_SCHEMA = [("", HubConfig)]
GATEWAY_SCHEMA = [("", GatewayConfig), ("sources[]", SimulatedConfig)]
HUB_KEYS = {k.path for prefix, cls in HUB_SCHEMA for k in iter_keys(cls, prefix)}
GATEWAY_KEYS = {k.path for prefix, cls in GATEWAY_SCHEMA for k in iter_keys(cls, prefix)}
GATEWAY_KEYS |= {"sources[].name", "sources[].type", "sources[]"}


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, phases=PHASES,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_what_check_config_accepts_runs_and_what_it_rejects_is_named(
        data: st.DataObject, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("cfg")
    hub_ex = data.draw(examples(HUB_SCHEMA, root), label="hub")
    gw_ex = data.draw(examples(GATEWAY_SCHEMA, root), label="gateway")
    gw_ex.data["sources"][0].update(name="tester", type="simulated")
    hub_errors, gw_errors = verdict(hub_ex.data), verdict(gw_ex.data)
    if hub_errors:
        check_rejection(hub_errors, hub_ex, HUB_KEYS)
    if gw_errors:
        check_rejection(gw_errors, gw_ex, GATEWAY_KEYS)
    event("rejected" if hub_errors or gw_errors else "accepted: started, one frame passed")
    if hub_errors or gw_errors:
        return
    hub_cfg = check_config(hub_ex.data, "gen.toml")
    assert isinstance(hub_cfg, HubConfig)
    restarts = run_pair(hub_cfg, gw_ex.data)
    if restarts:
        event("restarted after the link timed out on this busy machine")


def test_a_frame_still_being_committed_when_the_link_comes_up_is_sent(tmp_path: Path) -> None:
    """Found by the property test: with ``spool.commit_max_delay_ms`` > 0, a frame appended
    but not yet durable when the uplink connected was neither live (it was older than the
    next seq) nor backlog (the backlog read only durable frames and then called itself
    done): it waited for the next reconnection, with a healthy link, for ever."""
    hub_cfg = check_config({"hub": {"port": 0, "data_dir": str(tmp_path / "hub")},
                            "gateways": {"ate-01": {"token": TOKEN}}}, "gen.toml")
    assert isinstance(hub_cfg, HubConfig)
    run_pair(hub_cfg, {
        "gateway": {"id": "ate-01", "token": TOKEN, "state_dir": str(tmp_path / "gw")},
        "spool": {"commit_max_delay_ms": 1000},
    })
