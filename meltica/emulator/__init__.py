"""A local Binance-spot-compatible exchange emulator around ``meltica.matching`` (README.md here).

``async with EmulatorServer(config) as emu:`` starts it on 127.0.0.1 (``with EmulatorThread(config) as emu:``
from synchronous code); ``ccxt_config(emu, key, secret)`` is the configuration that points ccxt's own
``binance`` / ``ccxt.pro.binance`` classes at it. ``EmulatorConfig(..., realtime=True)`` makes it a
real-time venue (recorded data shifted to the wall clock), as ``meltica emulator binance`` runs by default.

It is a local test venue: it listens on loopback only unless ``EmulatorConfig(allow_remote=True)``, and its
admin API (``/_emulator/...``) answers only requests carrying ``emu.admin_token`` in the
``X-Emulator-Admin-Token`` header (``emu.admin_headers()``).
"""

from __future__ import annotations

import re
from typing import Any

from meltica.adapters.local_venue import CCXT_OPTIONS, ccxt_urls_for
from meltica.emulator.background import EmulatorThread
from meltica.emulator.config import (
    ADMIN_TOKEN_HEADER,
    EmulatorAccount,
    EmulatorConfig,
    is_loopback_host,
    parse_account,
    parse_balances,
)
from meltica.emulator.errors import BinanceError
from meltica.emulator.faults import Faults
from meltica.emulator.limits import RateLimits
from meltica.emulator.server import EmulatorServer

_HOST = re.compile(r"^(https?|wss?)://[^/]+")


def ccxt_config(
    emu: EmulatorServer | EmulatorThread, api_key: str | None = None, secret: str | None = None
) -> dict[str, Any]:
    """The constructor config for ``ccxt.async_support.binance(...)`` / ``ccxt.pro.binance(...)``."""
    config: dict[str, Any] = {
        "urls": {"api": emu.ccxt_urls()},
        "options": {k: (dict(v) if isinstance(v, dict) else v) for k, v in CCXT_OPTIONS.items()},
        "enableRateLimit": False,
    }
    if api_key is not None:
        config["apiKey"] = api_key
    if secret is not None:
        config["secret"] = secret
    return config


def point_ccxt_at(exchange: Any, emu: EmulatorServer | EmulatorThread) -> None:
    """Rewrite the host of every ``exchange.urls['api']`` entry (REST and ws) to the emulator's."""

    def rewrite(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: rewrite(v) for k, v in value.items()}
        if isinstance(value, str):
            match = _HOST.match(value)
            if match:
                base = emu.ws_url if match.group(1).startswith("ws") else emu.rest_url
                return base + value[match.end() :]
        return value

    exchange.urls["api"] = rewrite(exchange.urls["api"])
    for key, value in CCXT_OPTIONS.items():
        exchange.options[key] = value


__all__ = [
    "ADMIN_TOKEN_HEADER",
    "CCXT_OPTIONS",
    "BinanceError",
    "EmulatorAccount",
    "EmulatorConfig",
    "EmulatorServer",
    "EmulatorThread",
    "Faults",
    "RateLimits",
    "ccxt_config",
    "ccxt_urls_for",
    "is_loopback_host",
    "parse_account",
    "parse_balances",
    "point_ccxt_at",
]
