"""Alerts (docs/alerts.md): rules evaluated against the live state, raised, de-duplicated,
acknowledged, escalated, persisted and delivered to webhooks.

- ``config``: the ``[alerts]`` section (rules, webhooks, settings).
- ``engine``: ``AlertEngine``, sans-IO: live figures and time in, alert events out; the
  live state's ``StateObserver``.
- ``service``: ``AlertService``, the Trio layer: persistence (``history_store``), ticking,
  webhook delivery (``webhooks``).
"""

from .config import RULE_KINDS, AlertRuleConfig, AlertsConfig, Priority, RuleKind, WebhookConfig
from .engine import Alert, AlertEngine
from .service import AlertService
from .webhooks import SIGNATURE_HEADER, Fenced, WebhookSender, post_json, sign

__all__ = [
    "RULE_KINDS", "SIGNATURE_HEADER", "Alert", "AlertEngine", "AlertRuleConfig", "AlertService",
    "AlertsConfig", "Fenced", "Priority", "RuleKind", "WebhookConfig", "WebhookSender",
    "post_json", "sign",
]
