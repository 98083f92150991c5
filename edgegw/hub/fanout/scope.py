"""A ``/ws/live`` client's scope (the fan-out's ``ClientScope``) from its signed-in
principal (``edgegw.auth``): which topics it is attached to, which alerts it may
acknowledge, and in whose name."""

from __future__ import annotations

from collections.abc import Callable

from ...auth.tokens import Principal
from ..topics import unquote


def lot_of_topic(topic: str) -> str | None:
    """The lot a live topic belongs to (``lot/<lot>...``, ``test/<lot>/...``), else None."""
    levels = topic.split("/")
    if len(levels) >= 2 and levels[0] in ("lot", "test"):
        return unquote(levels[1])
    return None


class LiveScope:
    """What one ``/ws/live`` client may see and do (edgegw.hub.fanout's client
    scope): lot topics within its ``lots`` claim; alert topics, which mix every lot's
    alerts, only without a lot scope; acknowledgements as an operator, in its own name."""

    def __init__(self, principal: Principal, anonymous: bool = False,
                 alert_lot: Callable[[str], str | None] | None = None) -> None:
        self.principal = principal
        self.user = None if anonymous else principal.user
        self.may_ack = principal.has("operator")
        self.alert_lot = alert_lot

    def allows_topic(self, topic: str) -> bool:
        p = self.principal
        if p.lots is None:
            return True
        if topic.startswith("alert/"):
            return False
        lot = lot_of_topic(topic)
        return lot is None or p.sees_lot(lot)

    def may_ack_alert(self, alert_id: str) -> bool:
        if self.principal.lots is None:
            return True
        if self.alert_lot is None:
            return False
        lot = self.alert_lot(alert_id)
        return lot is None or self.principal.sees_lot(lot)


__all__ = ["LiveScope", "lot_of_topic"]
