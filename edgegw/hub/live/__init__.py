"""The hub's live state: what the dashboards look at, built from applied records (sans-IO).

- ``state``: ``LiveState``, which routes records to the entities, keeps them bounded
  (eviction, archiving) and publishes a delta per changed topic; ``replay``.
- ``models``: the entities (lots, wafers, dies, tests, sensors, gateways) and their figures.
- ``checks``: type checks on record fields.
- ``observer``: ``StateObserver``, the protocol the alert engine implements.
"""

from .models import lot_archive
from .observer import StateObserver
from .state import LiveState, Publish, replay

__all__ = ["LiveState", "Publish", "StateObserver", "lot_archive", "replay"]
