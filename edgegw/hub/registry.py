"""Which connection speaks for each gateway: the newest one.

A gateway whose link half-died (the peer vanished without a FIN, so the hub has not
noticed yet) reconnects and must be let in at once, not told to wait until the old
connection's heartbeat expires.  So a valid HELLO for a gateway id that is connected
already **replaces** the old connection: its tasks are cancelled and it is closed with
4008 (docs/protocol.md section 4).

Exactly-once across a takeover: the old connection may be committing frames it received
just before.  A session holds its gateway's *owner lock* from before it reads the applied
set for WELCOME until its applier has stopped, and the new session waits for that lock;
so WELCOME always includes everything the old session committed.  The store's commit also
skips any frame already applied (``HubStore.commit``): a constraint, not an ordering, is
what finally keeps a frame from being applied twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import trio


class GatewaySession:
    """One accepted gateway connection."""

    def __init__(self, gateway: str, remote: str, epoch: str, token_digest: str = "") -> None:
        self.gateway = gateway
        self.remote = remote
        self.epoch = epoch
        self.since = time.time()
        self.rtt_ms: float | None = None
        self.cancel_scope = trio.CancelScope()
        self.replaced = False
        #: the SHA-256 of the token it was admitted with (a config reload checks it again)
        self.token_digest = token_digest
        #: why a config reload closes it (4001): its gateway removed, or its token changed
        self.revoked: str | None = None
        #: the store's generation of this connection (a cluster's fence; 0 in one process)
        self.generation = 0


class GatewayRegistry:
    """The current session of each gateway id, and the per-gateway owner locks."""

    def __init__(self) -> None:
        self.sessions: dict[str, GatewaySession] = {}
        self._owners: dict[str, trio.Lock] = {}  # one per configured gateway id at most

    def __contains__(self, gateway: object) -> bool:
        return gateway in self.sessions

    def __len__(self) -> int:
        return len(self.sessions)

    def __iter__(self) -> Iterator[str]:
        return iter(self.sessions)

    def get(self, gateway: str) -> GatewaySession | None:
        return self.sessions.get(gateway)

    def claim(self, session: GatewaySession) -> GatewaySession | None:
        """Make ``session`` the gateway's current one; the one it replaces (cancelled
        already) or None."""
        old = self.sessions.get(session.gateway)
        self.sessions[session.gateway] = session
        if old is not None:
            old.replaced = True
            old.cancel_scope.cancel()
        return old

    def owner(self, gateway: str) -> trio.Lock:
        """Held by a session while it reads or writes the gateway's applied state."""
        lock = self._owners.get(gateway)
        if lock is None:
            lock = self._owners[gateway] = trio.Lock()
        return lock

    def release(self, session: GatewaySession) -> bool:
        """Forget ``session``; True if it was still the gateway's current one."""
        if self.sessions.get(session.gateway) is session:
            del self.sessions[session.gateway]
            return True
        return False
