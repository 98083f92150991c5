"""The hub: gateways in (``Ingest``), the live state, alerts, the live fan-out, the
dashboard and the history API, assembled as ``Hub``.

Public face (for embedders, plugins and tests): the names in ``__all__``, and the
subpackages and modules named there (``live``, ``fanout``, ``alerts``: each with its own
face; ``topics``: the topic names; ``history``: the history API's queries; ``store``,
``checkpoint``, ``history_store``: what the hub keeps on disk, docs/storage.md; ``cluster``:
the hub as a cluster of nodes, docs/cluster.md).  Everything
else inside is internal.  Names load on first use (PEP 562), so importing one hub module
does not import the whole hub.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazyface import lazy_face

_EXPORTS = {
    "Hub": "edgegw.hub.app",
    "Ingest": "edgegw.hub.ingest",
    "HubConfig": "edgegw.hub.config",
    "HubStore": "edgegw.hub.store",
    "FrameToApply": "edgegw.hub.store",
    "Dashboard": "edgegw.hub.dashboard",
    "STATIC_DIR": "edgegw.hub.dashboard",
    "GcPacer": "edgegw.hub.gcpacing",
    "HistoryApi": "edgegw.hub.history",
    "RetentionClock": "edgegw.hub.retention",
    "PositionsKeeper": "edgegw.hub.positions",
}
_SUBMODULES = ("alerts", "checkpoint", "cluster", "fanout", "history", "history_store", "live",
               "store", "topics")

__all__ = [*sorted(_EXPORTS), *_SUBMODULES]

if TYPE_CHECKING:
    from .app import Hub as Hub
    from .config import HubConfig as HubConfig
    from .dashboard import STATIC_DIR as STATIC_DIR
    from .dashboard import Dashboard as Dashboard
    from .gcpacing import GcPacer as GcPacer
    from .history import HistoryApi as HistoryApi
    from .ingest import Ingest as Ingest
    from .positions import PositionsKeeper as PositionsKeeper
    from .retention import RetentionClock as RetentionClock
    from .store import FrameToApply as FrameToApply
    from .store import HubStore as HubStore

__getattr__, __dir__ = lazy_face(__name__, globals(), _EXPORTS, _SUBMODULES)
