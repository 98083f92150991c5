"""Exponential backoff with full jitter, sans-IO.

Each delay is drawn uniformly from [0, min(maximum, initial * multiplier**attempt)]
("full jitter"): a floor of gateways that lost the hub (or the broker) at the same moment
does not come back at the same moment, and nobody retries at a fixed interval.  Pure: no
clock, no sleeping; the caller sleeps.  Used by the uplink and the MQTT client.

``Reconnect`` is the uplink's whole policy on top of it: probe an unreachable hub on a
short jittered cap, back off only after failures *at* the hub, honour a hub's retry hint
(docs/protocol.md section 7).
"""

from __future__ import annotations

import random

#: the longest server hint (Retry-After) honoured: the most ``hub.busy_retry_after_s`` says
RETRY_AFTER_MAX_S = 3600.0


class Backoff:
    """``next_delay()`` after each failure, ``reset()`` after a success."""

    def __init__(self, initial: float, maximum: float, multiplier: float = 2.0,
                 rng: random.Random | None = None) -> None:
        if initial <= 0 or maximum < initial or multiplier < 1:
            raise ValueError(
                f"backoff needs 0 < initial <= maximum and multiplier >= 1 "
                f"(got initial={initial}, maximum={maximum}, multiplier={multiplier})")
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.rng = rng or random.Random()
        self.attempt = 0  # consecutive failures since the last reset

    def cap(self) -> float:
        """The upper bound of the next delay."""
        return min(self.maximum, self.initial * self.multiplier ** min(self.attempt, 64))

    @property
    def ceiling(self) -> float:
        return self.cap()

    @property
    def at_cap(self) -> bool:
        """Retrying at the longest interval (a broker refusing our credentials, say)."""
        return self.cap() >= self.maximum

    def next_delay(self) -> float:
        delay = self.rng.uniform(0, self.cap())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


class Reconnect:
    """When a client (the gateway's uplink) should next try to reach its server.

    Two kinds of waiting, because they protect different things:

    - **The server could not be reached** (connection refused, no route, no answer to a
      connect): nothing of the server's is spent, so the client probes again soon, after
      ``uniform(0, probe_interval)``.  A returned link is noticed within ``probe_interval``.
    - **The server was reached and the attempt failed there** (refused the handshake,
      closed the connection, did not answer in time): the server may be overloaded or
      misconfigured, so attempts back off exponentially with full jitter (``Backoff``).
      A server's own hint (``retry_after``: it is shedding load) is honoured: never earlier
      (up to an hour), plus up to as much again of jitter so a floor of clients does not
      return in step.

    A session only counts as a success once it has stayed up for ``stable_after``
    seconds: a server that accepts and at once closes the session (two clients sharing one
    id, say) is not hammered in a loop.  A session that ends because the *link* was lost
    (no close from the server) is followed by probing at once, however short it was.
    Pure: the caller keeps the clock and does the sleeping.
    """

    def __init__(self, backoff: Backoff, probe_interval: float = 1.0,
                 stable_after: float = 10.0, rng: random.Random | None = None) -> None:
        if probe_interval <= 0 or stable_after < 0:
            raise ValueError(f"need probe_interval > 0 and stable_after >= 0 "
                             f"(got {probe_interval}, {stable_after})")
        self.backoff = backoff
        self.probe_interval = probe_interval
        self.stable_after = stable_after
        self.rng = rng or backoff.rng
        self.connected_at: float | None = None

    def probe_delay(self) -> float:
        """Before the next probe of a server that could not be reached."""
        return self.rng.uniform(0, self.probe_interval)

    def failed(self) -> float:
        """The server was reached but the attempt failed: exponential backoff."""
        return self.backoff.next_delay()

    def busy(self, retry_after: float) -> float:
        """The server asked to come back after ``retry_after`` seconds -- honoured up to
        ``RETRY_AFTER_MAX_S``: a hint of years (a misconfigured proxy's) would leave the
        client silent that long after its server was back."""
        retry_after = min(max(0.0, retry_after), RETRY_AFTER_MAX_S)
        self.backoff.attempt += 1
        return retry_after + self.rng.uniform(0, max(retry_after, self.probe_interval))

    def config_problem(self) -> float:
        """Credentials or versions refused: retry, but only at the slowest pace."""
        self.backoff.attempt = 64
        return self.backoff.next_delay()

    def connected(self, now: float) -> None:
        self.connected_at = now

    def disconnected(self, now: float, link_lost: bool = False) -> float:
        """A session has ended (or never got going).  0 (probe at once) after a stable
        session, or when the link was lost (no close from the server: probing costs the
        server nothing); a failure at the server when it ended the session early."""
        since, self.connected_at = self.connected_at, None
        if since is None:
            return self.failed()
        if now - since >= self.stable_after:
            self.backoff.reset()
            return 0.0
        return 0.0 if link_lost else self.failed()


__all__ = ["Backoff", "Reconnect"]
