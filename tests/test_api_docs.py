"""docs/api.md is what the HTTP API answers.

A hub and a gateway run as real processes from the shipped example configs (the gateway's
with the MQTT fragment of conf/gateway-mqtt.example.toml copied in, as that file says to
do, and an STDF source), until the hub holds lots, wafers, tests and an alert.  Then every
route the doc lists is asked, and the fields of its example answer are compared with the
real answer's, level by level: a field the doc shows that the answer lacks, or one the
answer has that the doc does not show, fails the test.  Every route the hub serves must be
in the doc, every answer carries a proper reason phrase (``HTTP/1.1 200 OK``), and every
``edgegw_*`` metric any doc names is on a live ``/metrics``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ports import free_port
from processes import wait_for
from prometheus_client.parser import text_string_to_metric_families
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, TextMessage
from wsproto.events import Request as WsRequest

from edgegw.config import build
from edgegw.hub import STATIC_DIR, Hub, HubConfig

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "api.md"
PLACEHOLDER = re.compile(r"<(\w+)>")

#: objects whose keys are data (gateway ids, bin numbers, sites, reasons): each value is
#: compared with the doc's first one
MAPS = {"gateways", "hard_bins", "soft_bins", "hard_bins_tested", "soft_bins_tested", "sites",
        "reasons"}
#: objects whose keys depend on what happened (the metrics, an alert rule's context): an
#: object, not compared further
OPAQUE = {"metrics", "context"}
#: objects holding a key only once the tester sent it: the answer's keys are among the doc's
SOME_OF = {"reported"}


@dataclasses.dataclass
class Route:
    method: str
    path: str  # with <placeholders>
    service: str  # "hub" or "gateway" (its status port)
    example: Any  # the parsed JSON example, or None for a route that answers text


def documented_routes() -> list[Route]:
    """Each ``### `METHOD PATH` `` section of docs/api.md and the first JSON block in it."""
    routes: list[Route] = []
    text = DOC.read_text()
    sections = re.split(r"^### ", text, flags=re.M)[1:]
    for section in sections:
        head, _, body = section.partition("\n")
        found = re.match(r"`(GET|POST) (/[^`]*)`(.*)", head)
        if found is None:
            continue
        method, path, rest = found.groups()
        body = body.split("\n## ")[0]
        block = re.search(r"```json\n(.*?)\n```", body, flags=re.S)
        routes.append(Route(method, path, "gateway" if "gateway status port" in rest else "hub",
                            json.loads(block.group(1)) if block else None))
    return routes


def kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object", type(None): "null"}[type(value)]


def differences(doc: Any, real: Any, where: str = "") -> list[str]:
    """How the shape of ``real`` differs from the documented example ``doc`` (null on either
    side matches anything: the doc says which fields may be null)."""
    if doc is None or real is None:
        return []
    if kind(doc) != kind(real):
        return [f"{where or '<top>'}: the doc shows {kind(doc)}, the answer has {kind(real)}"]
    name = where.rsplit(".", 1)[-1]
    if isinstance(doc, dict):
        if name in OPAQUE:
            return []
        if name in MAPS:
            if not doc:
                return []
            first = next(iter(doc.values()))
            return [d for k, v in real.items() for d in differences(first, v, f"{where}.{k}")]
        out = []
        if name not in SOME_OF:
            out += [f"{where}.{k}: in the doc, not in the answer" for k in doc if k not in real]
        out += [f"{where}.{k}: in the answer, not in the doc" for k in real if k not in doc]
        out += [d for k in doc if k in real for d in differences(doc[k], real[k], f"{where}.{k}")]
        return out
    if isinstance(doc, list) and doc:
        return [d for i, item in enumerate(real)
                for d in differences(doc[min(i, len(doc) - 1)], item, f"{where}[{i}]")]
    return []


# ---- a live hub and gateway -------------------------------------------------------------


@dataclasses.dataclass
class Floor:
    hub: int  # port
    gateway: int  # status port
    values: dict[str, str]  # placeholder -> a real value

    def url(self, service: str, path: str) -> str:
        return f"http://127.0.0.1:{self.hub if service == 'hub' else self.gateway}{path}"


def request(url: str, body: bytes | None = None) -> tuple[int, str, dict[str, str], bytes]:
    """(status, reason phrase, headers, body) of a GET, or of a JSON POST when ``body`` is
    given."""
    headers = {"content-type": "application/json"} if body is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers),
                                    timeout=10) as r:
            return r.status, r.reason, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.reason, dict(exc.headers), exc.read()


def get(url: str) -> Any:
    status, _, _, body = request(url)
    assert status == 200, (url, status, body)
    return json.loads(body)


@contextlib.contextmanager
def live_client(port: int) -> Iterator[None]:
    """A /ws/live subscriber (to the quiet hub/state topic) for as long as the block runs,
    so that /api/live/stats has a client to show."""
    ws = WSConnection(ConnectionType.CLIENT)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(ws.send(WsRequest(host="127.0.0.1", target="/ws/live",
                                       subprotocols=["edgegw.live.v1.json"])))
        while True:
            ws.receive_data(sock.recv(65536))
            if any(isinstance(e, AcceptConnection) for e in ws.events()):
                break
        sock.sendall(ws.send(TextMessage(json.dumps({"type": "subscribe",
                                                     "topics": ["hub/state"]}))))
        yield


def gateway_toml(tmp: Path, hub_port: int) -> Path:
    """conf/gateway.toml with the MQTT fragment copied in (its broker absent: the source
    keeps retrying, its metrics exist) and an STDF source on an empty directory."""
    (tmp / "stdf").mkdir()
    text = ((REPO / "conf" / "gateway.toml").read_text() + "\n"
            + (REPO / "conf" / "gateway-mqtt.example.toml").read_text()
            .replace("port = 1883", f"port = {free_port()}")
            + f'\n[[sources]]\nname = "stdf"\ntype = "stdf"\npaths = ["{tmp / "stdf"}"]\n')
    path = tmp / "gateway.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def floor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Floor]:
    tmp = tmp_path_factory.mktemp("floor")
    hub_port, status_port = free_port(), free_port()
    edgegw = [sys.executable, "-m", "edgegw"]
    hub = subprocess.Popen([
        *edgegw, "hub", "--config", "conf/hub.toml", "--set", f"hub.port={hub_port}",
        "--set", f'hub.data_dir="{tmp / "hub"}"',
        # every wafer raises the wafer-yield alert, whatever the simulated yield
        "--set", "alerts.rules.0.threshold=1.0", "--set", "alerts.rules.0.min_parts=20",
    ], cwd=REPO, stdout=subprocess.DEVNULL, stderr=(tmp / "hub.log").open("wb"))
    gateway = subprocess.Popen([
        *edgegw, "gateway", "--config", str(gateway_toml(tmp, hub_port)),
        "--set", f'gateway.hub_url="ws://127.0.0.1:{hub_port}/ws/gateway"',
        "--set", f'gateway.state_dir="{tmp / "gw"}"', "--set", f"gateway.status_port={status_port}",
        "--set", "sources.0.parts_per_second=500",
    ], cwd=REPO, stdout=subprocess.DEVNULL, stderr=(tmp / "gateway.log").open("wb"))
    try:
        hub_url = f"http://127.0.0.1:{hub_port}"

        def ready() -> dict[str, str] | None:
            lots = get(f"{hub_url}/api/lots")["lots"]
            if not lots or lots[0]["wafers"] < 2:
                return None
            lot = lots[0]["lot_id"]
            wafers = get(f"{hub_url}/api/lots/{lot}/wafers")["wafers"]
            alerts = get(f"{hub_url}/api/alerts")["alerts"]
            if not alerts or len(alerts) < 2 or wafers[0]["status"] != "closed":
                return None
            return {"lot": lot, "wafer": wafers[0]["wafer_id"], "test_num": "100",
                    "id": alerts[-1]["id"], "file": next(STATIC_DIR.glob("*.js")).name}

        values = wait_for(ready, timeout=120, interval=0.5)
        yield Floor(hub_port, status_port, values)
    finally:
        for proc in (gateway, hub):
            proc.terminate()
            proc.wait(30)
        for proc, log in ((gateway, "gateway.log"), (hub, "hub.log")):
            # a clean stop on SIGTERM, nothing logged above a warning
            assert proc.returncode == 0, (tmp / log).read_text()[-3000:]


# ---- the doc against the live answers ---------------------------------------------------


ROUTES = documented_routes()


def test_the_doc_lists_routes_with_examples() -> None:
    assert len(ROUTES) >= 12
    assert all(r.example is not None for r in ROUTES if r.path.startswith("/api/"))


def test_every_route_the_hub_serves_is_in_the_doc(tmp_path: Path) -> None:
    http = Hub(build(HubConfig, {"hub": {"data_dir": str(tmp_path)}})).ingest.http
    documented = {(r.method, r.path) for r in ROUTES if r.service == "hub"}
    for method, path in http.routes:
        assert (method, path) in documented, f"{method} {path} is not in docs/api.md"
    for method, prefix, _ in http.prefix_routes:
        assert any(m == method and p.startswith(prefix) for m, p in documented), \
            f"{method} {prefix}... is not in docs/api.md"


#: sign-in routes: a hub without sign-in (the shipped loopback config asked here) cannot
#: sign anyone in; tests/test_auth.py asks a hub with sign-in
SIGN_IN = {("POST", "/login"), ("POST", "/logout")}


@pytest.mark.parametrize("route", [r for r in ROUTES if (r.method, r.path) not in SIGN_IN],
                         ids=lambda r: f"{r.service} {r.method} {r.path}")
def test_each_documented_answer_has_the_fields_of_the_real_one(route: Route,
                                                               floor: Floor) -> None:
    path = PLACEHOLDER.sub(lambda m: floor.values[m.group(1)], route.path)
    body = json.dumps({"user": "api-doc-test"}).encode() if route.method == "POST" else None
    with live_client(floor.hub):
        url = floor.url(route.service, path)
        if path == "/api/live/stats":  # the client is counted once its subscription is in
            wait_for(lambda: get(url)["clients"][0]["subscriptions"], timeout=30)
        status, reason, headers, data = request(url, body)
    assert (status, reason) == (200, "OK"), data[:300]
    if route.example is None:
        return
    assert headers["content-type"] == "application/json"
    answer = json.loads(data)
    assert differences(route.example, answer) == [], json.dumps(answer, indent=1)[:4000]


def test_a_route_that_does_not_exist_is_404_with_its_reason_phrase(floor: Floor) -> None:
    status, reason, _, body = request(floor.url("hub", "/api/nothing"))
    assert (status, reason, json.loads(body)) == (404, "Not Found", {"error": "not found"})
    status, reason, _, body = request(floor.url("hub", f"/api/lots/{floor.values['lot']}"
                                                       "/wafers/no-such-wafer"))
    assert (status, reason) == (404, "Not Found") and "error" in json.loads(body)
    status, reason, _, _ = request(floor.url("hub", "/api/alerts/x/ack"), b"{}")
    assert (status, reason) == (400, "Bad Request")


def test_every_metric_a_doc_names_is_on_a_live_metrics_page(floor: Floor) -> None:
    exposed = set()
    for service in ("hub", "gateway"):
        status, _, headers, body = request(floor.url(service, "/metrics"))
        assert status == 200 and headers["content-type"].startswith("text/plain")
        exposed |= set(re.findall(r"^# TYPE (\S+)", body.decode(), flags=re.M))
    named: dict[str, str] = {}
    for doc in sorted((REPO / "docs").glob("*.md")):
        for name in re.findall(r"`(edgegw_[a-z0-9_]+)", doc.read_text()):
            # not a package (edgegw_atdf) nor the session cookie
            if importlib.util.find_spec(name) is None and name != "edgegw_session":
                named.setdefault(name, doc.name)
    # a name written as `edgegw_x_total` or as a family prefix of one
    missing = {n: d for n, d in named.items()
               if n not in exposed and not any(e.startswith(n) for e in exposed)}
    assert not missing, f"named in docs, not on /metrics: {missing}"


def test_differences_finds_a_missing_an_undocumented_and_a_retyped_field() -> None:
    doc = {"a": 1, "b": {"c": "x"}, "sites": {"0": {"dies": 1}}, "rows": [[1, True]]}
    real = {"a": "1", "b": {"d": "x"}, "sites": {"3": {"dies": 2, "new": 0}},
            "rows": [[1, True]], "e": None}
    assert sorted(differences(doc, real)) == [
        ".a: the doc shows number, the answer has string",
        ".b.c: in the doc, not in the answer",
        ".b.d: in the answer, not in the doc",
        ".e: in the answer, not in the doc",
        ".sites.3.new: in the answer, not in the doc",
    ]
    assert differences(doc, {**doc, "a": None}) == []


# ---- /metrics as Prometheus and Grafana read it ------------------------------------------


def scrape(floor: Floor, service: str) -> dict[str, Any]:
    """The families of a live ``/metrics``, parsed by prometheus_client's own parser."""
    status, _, _, body = request(floor.url(service, "/metrics"))
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def sample(families: dict[str, Any], name: str, **labels: str) -> float:
    return sum(s.value for f in families.values() for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


@pytest.mark.parametrize("service", ["hub", "gateway"])
def test_metrics_parse_with_process_and_build_info(floor: Floor, service: str) -> None:
    families = scrape(floor, service)
    build = families["edgegw_build_info"].samples[0]
    assert build.labels["version"] == importlib.metadata.version("edgegw") and build.value == 1
    assert sample(families, "process_resident_memory_bytes") > 10e6
    assert sample(families, "process_open_fds") > 3
    assert sample(families, "process_cpu_seconds_total") > 0
    # counters carry _total; histograms their units
    for f in families.values():
        if f.name.startswith("edgegw_") and f.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in f.samples), f.name
    if service == "gateway":
        assert families["edgegw_source_errors"].type == "counter"


def test_hub_histograms_count_what_the_hub_applied(floor: Floor) -> None:
    families = scrape(floor, "hub")
    records = sample(families, "edgegw_hub_records_applied_total")
    frames = sample(families, "edgegw_hub_frames_applied_total")
    assert records > 1000 and frames > 0
    # one scrape is one consistent snapshot: every applied record has its age observed
    assert sample(families, "edgegw_hub_record_age_seconds_count") == records
    assert sample(families, "edgegw_hub_frame_apply_seconds_count") >= frames
    # a simulated record is applied within seconds of its creation (le is a bound)
    within_10s = sample(families, "edgegw_hub_record_age_seconds_bucket", le="10.0")
    assert within_10s >= 0.9 * records
    assert families["edgegw_live_send_seconds"].type == "histogram"


def test_gateway_histograms_count_its_fsyncs(floor: Floor) -> None:
    families = scrape(floor, "gateway")
    fsyncs = sample(families, "edgegw_spool_fsyncs_total")
    assert fsyncs > 0
    assert sample(families, "edgegw_spool_fsync_seconds_count") == fsyncs
    assert families["edgegw_mqtt_window_lag_seconds"].type == "histogram"


def test_every_metric_the_grafana_dashboard_queries_is_on_a_live_metrics_page(
        floor: Floor) -> None:
    dashboard = json.loads((REPO / "packaging" / "grafana" / "edgegw.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert len(exprs) >= 20
    queried = {name for e in exprs
               for name in re.findall(r"\b((?:edgegw|process|python)_[a-z0-9_]+)", e)}
    exposed = {s.name for service in ("hub", "gateway")
               for f in scrape(floor, service).values() for s in f.samples}
    assert not queried - exposed, f"the dashboard queries what no /metrics has: " \
                                  f"{sorted(queried - exposed)}"
    # every histogram the issue asks for is on the dashboard
    for name in ("hub_frame_apply_seconds", "hub_record_age_seconds", "live_send_seconds",
                 "spool_fsync_seconds", "mqtt_window_lag_seconds"):
        assert f"edgegw_{name}_bucket" in queried
