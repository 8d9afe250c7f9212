"""``create_adapter(exchange_id, ...)``: the one place an ``ExchangeAdapter`` is built from config.

``"paper"`` is the in-process paper venue (``meltica.adapters.in_process.InProcessAdapter``, imported lazily);
every other name is a ccxt exchange id, built from ``ccxt.pro`` (websockets + async REST) when ccxt
has a pro class for it, else from ``ccxt.async_support`` (REST only; streams then poll).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from typing import Any

from meltica.adapters.base import ExchangeAdapter
from meltica.errors import ConfigurationError

PAPER = "paper"


def _ccxt_class(exchange_id: str) -> Any:
    # lazy: ccxt takes about a second to import; only a ccxt venue needs it
    import ccxt.async_support as ccxt_async
    import ccxt.pro as ccxt_pro

    if exchange_id in getattr(ccxt_pro, "exchanges", ()):
        return getattr(ccxt_pro, exchange_id)
    if exchange_id in ccxt_async.exchanges:
        return getattr(ccxt_async, exchange_id)
    raise ConfigurationError(f"unknown exchange {exchange_id!r}: not a ccxt exchange id", field="exchange")


_ccxt_verbose_log = logging.getLogger("ccxt.verbose")


def _verbose_echo(*args: Any) -> None:
    _ccxt_verbose_log.info(" ".join(str(arg) for arg in args))


def _replace_urls(current: Any, urls: Mapping[str, Any]) -> Any:
    """Deep-merge ``urls`` over ccxt's ``exchange.urls`` (``{"api": {"public": ...}}``)."""
    if not isinstance(current, dict):
        return dict(urls)
    merged = dict(current)
    for key, value in urls.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _replace_urls(merged[key], value)
        else:
            merged[key] = value
    return merged


def create_adapter(
    exchange_id: str,
    *,
    account: str,
    credentials: Mapping[str, str] | None = None,
    sandbox: bool = False,
    urls: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    **adapter_kwargs: Any,
) -> ExchangeAdapter:
    """Build the adapter for ``exchange_id``.

    ``credentials``: ccxt names (``apiKey``, ``secret``, ``password``, ``uid``); never logged.
    ``urls``: merged over the ccxt class's ``urls`` (the emulator's ``ccxt_urls()`` fits here).
    ``options``: merged over ccxt's ``options``. ``adapter_kwargs`` go to ``CcxtAdapter`` (policies,
    budgets, clock) or to ``InProcessAdapter``.
    """
    if exchange_id == PAPER:
        if "venue" not in adapter_kwargs:
            raise ConfigurationError(
                "the paper adapter needs venue=InProcessVenue(...): the simulated exchange it trades on",
                field="venue",
            )
        module = importlib.import_module("meltica.adapters.in_process")
        paper_cls = module.InProcessAdapter
        adapter: ExchangeAdapter = paper_cls(account=account, **adapter_kwargs)
        return adapter

    # lazy: ccxt takes about a second to import; only a ccxt venue needs it
    from meltica.adapters.ccxt import CcxtAdapter

    cls = _ccxt_class(exchange_id)
    config: dict[str, Any] = {"enableRateLimit": True, **dict(credentials or {})}
    exchange = cls(config)
    # ccxt's verbose request/response echo goes to print(); through logging it is scrubbed of secrets.
    exchange.log = _verbose_echo
    if options:
        exchange.options = {**exchange.options, **dict(options)}
    if sandbox:
        exchange.set_sandbox_mode(True)
    if urls:
        exchange.urls = _replace_urls(exchange.urls, urls)
    return CcxtAdapter(exchange, account=account, **adapter_kwargs)
