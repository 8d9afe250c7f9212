"""The Faust app factory for Meltica's workers (STACK-NOTES.md: faust-streaming 0.15.3)."""

from __future__ import annotations

from typing import Any

import faust

# Lower than Faust's defaults (session 60 s, rebalance 60 s) so group joins and failovers are quick
# on the dev broker (STACK-NOTES.md, Kafka section).
GROUP_TIMEOUTS: dict[str, float] = {
    "broker_session_timeout": 6.0,
    "broker_heartbeat_interval": 2.0,
    "broker_rebalance_timeout": 6.0,
}


def make_app(bootstrap: str, app_id: str, **overrides: Any) -> faust.App:
    """A Faust app on ``bootstrap`` (``host:port[,host:port]``). ``app_id`` is also the consumer group.

    Defaults: in-memory table store, no web server, no autodiscovery, our group timeouts, new groups
    start at the earliest offset. Faust declares only its internal topics (assignor leader, changelogs);
    the catalogue topics are made by ``meltica streams topics create``.
    """
    servers = ";".join(f"kafka://{server.strip()}" for server in bootstrap.split(",") if server.strip())
    settings: dict[str, Any] = {
        "broker": servers,
        "store": "memory://",
        "web_enabled": False,
        "autodiscover": False,
        "consumer_auto_offset_reset": "earliest",
        **GROUP_TIMEOUTS,
    }
    settings.update(overrides)
    return faust.App(app_id, **settings)
