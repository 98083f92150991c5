"""Alerts (docs/alerts.md): rules evaluated against the live state, raised, de-duplicated,
acknowledged, escalated, persisted and delivered to webhooks.

- ``config``: the ``[alerts]`` section (rules, webhooks, settings).
- ``engine``: ``AlertEngine``, sans-IO: live figures and time in, alert events out; the
  live state's ``StateObserver``.
- ``service``: ``AlertService``, the Trio layer: persistence (``history_store``), ticking,
  webhook delivery (``webhooks``) and its durable outbox (``outbox``: at least once across
  a restart; rows the store could not take held in memory until it can).
"""

from .config import RULE_KINDS, AlertRuleConfig, AlertsConfig, Priority, RuleKind, WebhookConfig
from .engine import Alert, AlertEngine, RuleChanges
from .outbox import MAX_HELD_ROWS, WebhookOutbox
from .service import MAX_HELD_ARCHIVE_BYTES, MAX_HELD_ARCHIVES, AlertService, reload_summary
from .webhooks import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    Fenced,
    WebhookSender,
    event_key,
    post_json,
    shown_url,
    sign,
    webhook_contexts,
)

__all__ = [
    "EVENT_ID_HEADER", "MAX_HELD_ARCHIVES", "MAX_HELD_ARCHIVE_BYTES", "MAX_HELD_ROWS",
    "RULE_KINDS", "SIGNATURE_HEADER", "Alert", "AlertEngine", "AlertRuleConfig",
    "AlertService", "AlertsConfig", "Fenced", "Priority", "RuleChanges", "RuleKind",
    "WebhookConfig",
    "WebhookOutbox", "WebhookSender", "event_key", "post_json", "reload_summary", "shown_url",
    "sign", "webhook_contexts",
]
