"""TLS contexts: the hub's listener (reloadable), the gateway's uplink, certificate identity.

The hub's ``ServerTls`` holds the context for new handshakes; ``reload()`` (on SIGHUP)
builds a fresh one from the files and swaps it in only if that worked, so a half-written
certificate never takes the port down, and live connections keep the session they have.

Every context verifies certificates as Python 3.11 and 3.12 do, on every Python: 3.13
added ``VERIFY_X509_STRICT`` to its defaults, which refuses a private CA made the way the
Mosquitto and OpenSSL how-tos make one (``openssl req -x509``: no key usage extension; a
leaf without an authority key identifier) -- a broker or hub certificate that worked on
3.12 would fail every handshake after an upgrade.  The chain, its dates and the host name
are checked as before (docs/security.md, "Certificates").
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
from typing import Any

log = logging.getLogger("edgegw.tls")

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _default_context(purpose: ssl.Purpose, cafile: str | None = None) -> ssl.SSLContext:
    """Python's default context without ``VERIFY_X509_STRICT`` (the module docstring)."""
    ctx = ssl.create_default_context(purpose, cafile=cafile)
    ctx.verify_flags &= ~ssl.VERIFY_X509_STRICT
    return ctx


def server_context(cert_file: str, key_file: str, client_ca_file: str = "",
                   min_version: str = "1.2") -> ssl.SSLContext:
    """A server context; with ``client_ca_file``, client certificates are asked for and
    verified when presented (CERT_OPTIONAL: a dashboard needs none, a gateway endpoint
    that requires one checks it per request)."""
    ctx = _default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        ctx.load_verify_locations(client_ca_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class ServerTls:
    """The current server context, replaced by ``reload()``."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "",
                 min_version: str = "1.2") -> None:
        self.files = (cert_file, key_file, client_ca_file, min_version)
        self.context = server_context(*self.files)
        self.reloads = 0

    def __call__(self) -> ssl.SSLContext:
        return self.context

    def reload(self) -> bool:
        """Read the files again; True if the new context is in use.  On failure the old one
        stays and the reason is logged (the operator fixes the files and signals again)."""
        try:
            context = server_context(*self.files)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("TLS reload failed, keeping the current certificate: %s", exc)
            return False
        self.context = context
        self.reloads += 1
        log.warning("TLS certificate reloaded from %s", self.files[0])
        return True


def client_context(ca_file: str = "", cert_file: str = "", key_file: str = "",
                   pin_sha256: str = "") -> ssl.SSLContext:
    """A client context verifying the server (system CAs, or ``ca_file``), presenting a
    client certificate when ``cert_file`` is given, and -- with ``pin_sha256`` -- failing
    the handshake unless the server's certificate has that SHA-256 fingerprint (on top of
    the CA check)."""
    ctx = _default_context(ssl.Purpose.SERVER_AUTH, ca_file or None)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file or None)
    if pin_sha256:
        # The check runs inside the handshake of every connection made with this context
        # (the probe's and the WebSocket's alike), so nothing is sent to an impostor.
        ctx.sslobject_class = _pinned(normalize_fingerprint(pin_sha256))
    return ctx


def _pinned(pin: str) -> type[ssl.SSLObject]:
    class PinnedSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            if not fingerprint_matches(self.getpeercert(binary_form=True), pin):
                raise ssl.SSLCertVerificationError(
                    "the server's certificate does not have the pinned SHA-256 fingerprint")

    return PinnedSSLObject


def cert_identities(cert: dict[str, Any] | None) -> set[str]:
    """The names a verified peer certificate (``getpeercert()``) stands for: its subject
    common name(s) and DNS subjectAltNames."""
    if not cert:
        return set()
    names = {value for rdn in cert.get("subject", ()) for key, value in rdn
             if key == "commonName"}
    names.update(value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS")
    return names


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate, as lowercase hex without separators."""
    return hashlib.sha256(der).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """``AB:CD:...`` or ``abcd...`` -> ``abcd...``."""
    return text.replace(":", "").replace(" ", "").lower()


def fingerprint_matches(der: bytes | None, pinned: str) -> bool:
    return der is not None and hmac.compare_digest(fingerprint(der),
                                                   normalize_fingerprint(pinned))


__all__ = [
    "ServerTls", "cert_identities", "client_context", "fingerprint", "fingerprint_matches",
    "normalize_fingerprint", "server_context",
]
