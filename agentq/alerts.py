"""Alerts on health transitions: a log record, a statsd event and a POST to a webhook.

Each channel fails on its own: a webhook that is down is logged and does not stop the log
record or the metric. Build one :class:`Alerter` per process.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from agentq.config import Settings
from agentq.health import HealthState, Transition, http_status

if TYPE_CHECKING:
    from statsd import StatsClient

logger = logging.getLogger("agentq.health")

#: Seconds the webhook may take to accept an alert.
WEBHOOK_TIMEOUT = 5.0


class Alerter:
    """Sends every transition to the log, statsd (when ``STATSD_HOST`` is set) and the webhook."""

    def __init__(self, settings: Settings) -> None:
        self.webhook_url = (
            settings.alert_webhook_url.get_secret_value() if settings.alert_webhook_url else None
        )
        self._statsd: StatsClient | None = None
        if settings.enable_metrics and settings.statsd_host:
            from statsd import StatsClient

            self._statsd = StatsClient(settings.statsd_host, settings.statsd_port)

    def send(self, transition: Transition) -> None:
        degraded = transition.state is HealthState.DEGRADED
        logger.log(
            logging.WARNING if degraded else logging.INFO,
            "health %s -> %s",
            transition.previous.value,
            transition.state.value,
            extra={
                "action": "health_transition",
                "previous": transition.previous.value,
                "state": transition.state.value,
                "failing": transition.failing,
            },
        )
        if self._statsd is not None:
            try:
                # Plain statsd has no event type: a counter per target state marks the
                # moment on a dashboard and the gauge holds the current state.
                self._statsd.incr(f"health.transition.{transition.state.value}")
                self._statsd.gauge("health.healthy", 0 if degraded else 1)
            except OSError:
                logger.warning("statsd unreachable", extra={"action": "health_alert_failed"})
        if self.webhook_url:
            self._post(transition)

    def _post(self, transition: Transition) -> None:
        try:
            status = http_status(
                "POST",
                self.webhook_url or "",
                headers={"Content-Type": "application/json"},
                body=json.dumps(transition.to_dict()).encode(),
                timeout=WEBHOOK_TIMEOUT,
            )
        except (OSError, ValueError) as exc:
            status, error = 0, type(exc).__name__
        else:
            error = f"HTTP {status}"
        if not 200 <= status < 300:
            # The URL may carry a token: only the failure's kind is logged.
            logger.error(
                "health alert webhook failed: %s",
                error,
                extra={"action": "health_alert_failed", "channel": "webhook"},
            )

    def close(self) -> None:
        if self._statsd is not None:
            self._statsd.close()
