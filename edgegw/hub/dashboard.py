"""The web dashboard's files: ``GET /`` and ``GET /static/<file>`` from ``edgegw/hub/static``.

No build step and nothing from the internet: the page, its script and its stylesheet are
plain files shipped in the package.  They are read once (through Trio's thread pool, never
blocking the event loop) and then served from memory.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

import trio

from ..web import HttpServer, Request, Response

STATIC_DIR = Path(__file__).with_name("static")

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}

# No other site may frame the dashboard: its Acknowledge buttons would be a click away
# under a decoy page (clickjacking).  SameSite=Strict keeps the session cookie out of a
# cross-site frame, but a hub without sign-in, or behind an SSO proxy whose own cookie
# the browser does send, would serve it signed in.  nosniff: a file is only its own type.
_HEADERS = (("content-security-policy", "frame-ancestors 'none'"),
            ("x-frame-options", "DENY"), ("x-content-type-options", "nosniff"))


class Dashboard:
    def __init__(self, static_dir: Path = STATIC_DIR) -> None:
        self.static_dir = static_dir
        self._cache: dict[str, tuple[bytes, str]] = {}

    def install(self, http: HttpServer) -> None:
        http.add_route("GET", "/", self.index)
        http.add_route("GET", "/static/*", self.static)

    async def index(self, request: Request) -> Response:
        return await self._file("index.html")

    async def static(self, request: Request) -> Response:
        return await self._file(request.path.removeprefix("/static/"))

    async def _file(self, name: str) -> Response:
        # One level, plain names only: no way out of the static directory.  No ":" either:
        # on Windows "C:name" is a path on another drive, which "/" would not catch.
        if not name or any(c in name for c in "/\\:") or name.startswith("."):
            return Response(404, b"not found", "text/plain")
        cached = self._cache.get(name)
        if cached is None:
            path = trio.Path(self.static_dir / name)
            # a file of this directory itself: not a symbolic link to one elsewhere
            if not await path.is_file() or (await path.resolve()).parent != (
                    await trio.Path(self.static_dir).resolve()):
                return Response(404, b"not found", "text/plain")
            body = await path.read_bytes()
            suffix = Path(name).suffix
            ctype = (_TYPES.get(suffix) or mimetypes.guess_type(name)[0]
                     or "application/octet-stream")
            cached = self._cache[name] = (body, ctype)
        body, ctype = cached
        return Response(200, body, ctype, list(_HEADERS))
