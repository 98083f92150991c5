"""The dashboard's sign-in page: a token in, an HttpOnly SameSite=Strict cookie out.

Sites without an identity provider mint tokens with ``edgegw token``; sites with one hand
the user's JWT over (or put an SSO proxy in front, which needs no sign-in at all).  The
page posts the token as JSON; the hub verifies it and sets it as the session cookie, which
the page's script can never read (HttpOnly) and no other site can make the browser send
(SameSite=Strict).  The cookie lives until the token expires, at most
``auth.session_max_age_s``.
"""

from __future__ import annotations

import json
import time

from .. import jsonutil
from ..web import HttpServer, Request, Response
from .access import COOKIE, Access
from .tokens import AuthError

PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>edgegw - sign in</title>
<style>
body { font-family: system-ui, sans-serif; background: #111418; color: #e6e6e6;
       display: flex; justify-content: center; margin-top: 10vh; }
form { width: 28rem; display: flex; flex-direction: column; gap: .6rem; }
textarea { height: 7rem; font-family: monospace; background: #1b2026; color: inherit;
           border: 1px solid #39414a; }
button { padding: .4rem; }
#error { color: #ff7b72; min-height: 1.2rem; }
</style></head>
<body><form id="signin">
<h1>edgegw hub</h1>
<label for="token">Access token (<code>edgegw token</code>, or from your identity
provider)</label>
<textarea id="token" name="token" autocomplete="off" spellcheck="false" required></textarea>
<button id="submit" type="submit">Sign in</button>
<div id="error" role="alert"></div>
</form><script src="/login.js"></script></body></html>
"""

SCRIPT = rb"""'use strict';
document.getElementById('signin').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const error = document.getElementById('error');
  error.textContent = '';
  const token = document.getElementById('token').value.trim();
  const r = await fetch('/login', {method: 'POST', credentials: 'same-origin',
    headers: {'content-type': 'application/json'}, body: JSON.stringify({token})});
  if (r.ok) {
    // back to the page asked for: a plain path on this hub, never another site
    // (a host after "//" or a backslash, a scheme: all refused by the pattern)
    const next = new URLSearchParams(location.search).get('next') || '/';
    location.assign(/^\/[A-Za-z0-9._~\-\/]*$/.test(next) && !next.startsWith('//') ? next : '/');
  } else {
    const body = await r.json().catch(() => ({}));
    error.textContent = body.error || ('sign-in failed: HTTP ' + r.status);
  }
});
"""

# the sign-in page runs nothing but its own script
_PAGE_HEADERS = [("content-security-policy",
                  "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
                  "connect-src 'self'; form-action 'self'; frame-ancestors 'none'"),
                 ("x-frame-options", "DENY")]


class SignIn:
    def __init__(self, access: Access) -> None:
        self.access = access

    def install(self, http: HttpServer) -> None:
        http.add_route("GET", "/login", self.page)
        http.add_route("GET", "/login.js", self.script)
        http.add_route("POST", "/login", self.login)
        http.add_route("POST", "/logout", self.logout)
        http.add_route("GET", "/api/session", self.session)

    async def page(self, request: Request) -> Response:
        return Response(200, PAGE, "text/html; charset=utf-8", list(_PAGE_HEADERS))

    async def script(self, request: Request) -> Response:
        return Response(200, SCRIPT, "text/javascript; charset=utf-8")

    async def login(self, request: Request) -> Response:
        try:
            body = jsonutil.loads(request.body or b"{}")
        except ValueError:
            body = None
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token.strip():
            return _error(400, "body must be {\"token\": \"...\"}")
        try:
            principal = self.access.verify_token(token.strip())
        except AuthError as exc:
            self.access.m_denied.inc(reason="sign_in")
            return _error(401, str(exc))
        max_age = self.access.config.session_max_age_s
        if principal.expires_at is not None:
            max_age = min(max_age, principal.expires_at - time.time())
        cookie = _cookie(token.strip(), max(0, int(max_age)), request.secure)
        payload = {"user": principal.user, "role": principal.role,
                   "lots": list(principal.lots) if principal.lots is not None else None,
                   "expires_at": principal.expires_at}
        return Response(200, json.dumps(payload).encode(), headers=[("set-cookie", cookie)])

    async def session(self, request: Request) -> Response:
        """Who the request is signed in as (the dashboard shows it; null without sign-in)."""
        p = request.principal
        signed_in = p is not None and p.via != "none"
        payload = {"user": p.user if signed_in else None,
                   "role": p.role if p is not None else None,
                   "lots": list(p.lots) if signed_in and p.lots is not None else None,
                   "expires_at": p.expires_at if signed_in else None,
                   "auth": "none" if self.access.open else "jwt"}
        return Response(200, json.dumps(payload).encode())

    async def logout(self, request: Request) -> Response:
        return Response(204, b"", headers=[("set-cookie", _cookie("", 0, request.secure))])


def _cookie(value: str, max_age: int, secure: bool) -> str:
    parts = [f"{COOKIE}={value}", "Path=/", f"Max-Age={max_age}", "HttpOnly",
             "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def _error(status: int, message: str) -> Response:
    return Response(status, json.dumps({"error": message}).encode())
