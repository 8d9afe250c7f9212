"""The ccxt adapter: any ccxt exchange id behind ``ExchangeAdapter`` (see ``adapter.py``)."""

from meltica.adapters.ccxt.adapter import CcxtAdapter, StreamPolicy
from meltica.adapters.ccxt.orders import OrderRequest, build_order_request
from meltica.adapters.ccxt.venues import BINANCE, GENERIC, VenueProfile, profile_for
from meltica.errors import StaleStreamError
from meltica.retry import RetryPolicy

__all__ = [
    "BINANCE",
    "GENERIC",
    "CcxtAdapter",
    "OrderRequest",
    "RetryPolicy",
    "StaleStreamError",
    "StreamPolicy",
    "VenueProfile",
    "build_order_request",
    "profile_for",
]
