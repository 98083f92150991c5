"""What a SIGHUP takes from the hub's config file while the hub runs: the ``[gateways]``
table, the ``[auth]`` sign-in settings and, where the hub can apply them, the ``[alerts]``
rules.

A tester added to the floor, a gateway's token rotated, a leaked one revoked, a yield
threshold tuned: none of these should restart the hub, which would make every gateway and
dashboard reconnect and replay the frames after its last checkpoint.  The gateway table is
read only when a HELLO is checked, so a new table takes effect at the next handshake; and a
connection whose gateway is no longer listed, or whose token the new table no longer
matches, is closed (4001) by the caller -- a revoked token stops at once, not at the
gateway's next reconnect.  ``[auth]`` (a signing key rotated or withdrawn, a role mapped
anew) is taken while sign-in stays on (``mode = "jwt"`` before and after), its key files
read again on every SIGHUP as the TLS files are: the caller loads them before anything is
applied and checks the open dashboard connections again; turning sign-in on or off waits
for a restart.  The alert rules (with ``dedup_window_s``, ``escalate_after_s`` and
``keep``) and the webhook list are handed to the running alert service when the hub
says it can take them (``alerts=True``).  Every other section was read at
start-up into long-lived things (the listening socket, the store, the live state's caps):
a change there is reported as waiting for a restart, not applied.  Pure: two configs in,
a plan out (``sighup.HubReloader`` applies it).
"""

from __future__ import annotations

import dataclasses

from .config import HubConfig


@dataclasses.dataclass(frozen=True)
class ReloadPlan:
    """``config``: the running config with what the file changes that is applied: its
    gateway table, its ``[auth]`` when ``auth_reload``, its ``[alerts]`` when taken; the
    gateway ids
    ``added``, ``removed`` and those whose token ``changed``; ``alerts_changed``: whether
    the ``[alerts]`` taken differ from the running ones; ``auth_reload``: the file's
    ``[auth]`` is taken and its key files are to be read again (sign-in on before and
    after: a key file may have changed under an unchanged section); ``restart_needed``:
    the sections (or keys) that differ in the file and are not applied."""

    config: HubConfig
    added: list[str]
    removed: list[str]
    changed: list[str]
    restart_needed: list[str]
    alerts_changed: bool = False
    auth_reload: bool = False

    @property
    def summary(self) -> str:
        """One line for the log: what changed in the gateway table."""
        parts = [f"{what} {', '.join(ids)}" for what, ids in (
            ("added", self.added), ("removed", self.removed),
            ("token changed", self.changed)) if ids]
        return "; ".join(parts) if parts else "no gateway added, removed or changed"


def plan(running: HubConfig, read: HubConfig, *, alerts: bool = False) -> ReloadPlan:
    """What reloading ``read`` (the file as it is now) over ``running`` does; ``alerts``:
    the running hub can take new ``[alerts]`` rules (``AlertService.reconfigure``)."""
    old, new = running.gateways, read.gateways
    config = dataclasses.replace(running, gateways=dict(new))
    restart_needed = [f.name for f in dataclasses.fields(HubConfig)
                      if f.name not in ("gateways", "alerts", "auth")
                      and getattr(running, f.name) != getattr(read, f.name)]
    auth_reload = _signs_in(running) and _signs_in(read)
    if auth_reload:
        config = dataclasses.replace(config, auth=read.auth)
    elif read.auth != running.auth:  # sign-in turned on or off: at a restart
        restart_needed.append("auth")
    alerts_changed = False
    if alerts:
        alerts_changed = read.alerts != running.alerts
        config = dataclasses.replace(config, alerts=read.alerts)
    elif read.alerts != running.alerts:
        restart_needed.append("alerts")
    return ReloadPlan(
        config=config,
        added=sorted(set(new) - set(old)),
        removed=sorted(set(old) - set(new)),
        changed=sorted(gw for gw in set(old) & set(new) if old[gw] != new[gw]),
        restart_needed=sorted(restart_needed, key=_section_order),
        alerts_changed=alerts_changed,
        auth_reload=auth_reload,
    )


def _signs_in(config: HubConfig) -> bool:
    return config.auth is not None and config.auth.mode == "jwt"


def _section_order(name: str) -> int:
    """The order the sections have in ``HubConfig`` (the log names them so)."""
    names = [f.name for f in dataclasses.fields(HubConfig)]
    return names.index(name.split(".")[0])
