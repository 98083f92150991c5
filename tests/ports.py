"""Free TCP ports for tests that need a real socket (a helper module, not a fixture file:
import it, never ``conftest``)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
