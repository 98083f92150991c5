"""What a SIGHUP takes from the hub's config file while the hub runs: the ``[gateways]`` table.

A tester added to the floor, a gateway's token rotated, a leaked one revoked: none of these
should restart the hub, which would make every gateway and dashboard reconnect and replay
the frames after its last checkpoint.  The gateway table is read only when a HELLO is
checked, so a new table takes effect at the next handshake; and a connection whose gateway
is no longer listed, or whose token the new table no longer matches, is closed (4001) by
the caller -- a revoked token stops at once, not at the gateway's next reconnect.  Every
other section was read at start-up into long-lived things (the listening socket, the
store, the live state's caps, the alert rules): a change there is reported as waiting for a
restart, not applied.  Pure: two configs in, a plan out (``Ingest.reload_config`` does it).
"""

from __future__ import annotations

import dataclasses

from .config import HubConfig


@dataclasses.dataclass(frozen=True)
class ReloadPlan:
    """``config``: the running config with the file's gateway table; the gateway ids
    ``added``, ``removed`` and those whose token ``changed``; ``restart_needed``: the other
    sections that differ in the file (not applied)."""

    config: HubConfig
    added: list[str]
    removed: list[str]
    changed: list[str]
    restart_needed: list[str]

    @property
    def summary(self) -> str:
        """One line for the log: what changed in the gateway table."""
        parts = [f"{what} {', '.join(ids)}" for what, ids in (
            ("added", self.added), ("removed", self.removed),
            ("token changed", self.changed)) if ids]
        return "; ".join(parts) if parts else "no gateway added, removed or changed"


def plan(running: HubConfig, read: HubConfig) -> ReloadPlan:
    """What reloading ``read`` (the file as it is now) over ``running`` does."""
    old, new = running.gateways, read.gateways
    return ReloadPlan(
        config=dataclasses.replace(running, gateways=dict(new)),
        added=sorted(set(new) - set(old)),
        removed=sorted(set(old) - set(new)),
        changed=sorted(gw for gw in set(old) & set(new) if old[gw] != new[gw]),
        restart_needed=[f.name for f in dataclasses.fields(HubConfig) if f.name != "gateways"
                        and getattr(running, f.name) != getattr(read, f.name)],
    )
