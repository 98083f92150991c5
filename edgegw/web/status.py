"""The status endpoints every edgegw service serves, the same way: ``/healthz`` (200 or 503
with a JSON body saying why), ``/api/stats`` (JSON) and ``/metrics`` (Prometheus text)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..metrics import Metrics
from .http import Request, Response, json_response
from .server import HttpServer

PROMETHEUS_TYPE = "text/plain; version=0.0.4"

#: ``(healthy, body)``: 200 with the body when healthy, else 503
Health = Callable[[], tuple[bool, dict[str, Any]]]


def install_status(http: HttpServer, *, health: Health, stats: Callable[[], dict[str, Any]],
                   metrics: Metrics) -> None:
    async def healthz(request: Request) -> Response:
        ok, body = health()
        return json_response(body, 200 if ok else 503)

    async def api_stats(request: Request) -> Response:
        return json_response(stats())

    async def prometheus(request: Request) -> Response:
        return Response(200, metrics.render_prometheus().encode(), PROMETHEUS_TYPE)

    http.add_route("GET", "/healthz", healthz)
    http.add_route("GET", "/api/stats", api_stats)
    http.add_route("GET", "/metrics", prometheus)
