"""Per-venue differences the unified ccxt API does not hide, kept small and in one place (DESIGN.md §9).

A ``VenueProfile`` says how a venue names the client order id, how a trailing stop is expressed,
and which native extras (iceberg, GTD) it takes. Unknown venues get ``GENERIC``, which uses only
ccxt's unified parameters.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VenueProfile:
    name: str
    # Parameter carrying our client order id on create (ccxt passes it through).
    client_id_param: str = "clientOrderId"
    # Parameter naming an existing order by client id on fetch / cancel (None: not supported).
    client_id_query_param: str | None = "clientOrderId"
    # Parameter naming the new client id of an amended order (cancel-replace / edit).
    amend_client_id_param: str = "clientOrderId"
    # Native iceberg: the parameter carrying the displayed quantity (None: not supported).
    iceberg_param: str | None = None
    # Trailing stops: "percent" → trailingPercent (+ stopLossOrTakeProfit on Binance spot),
    # "amount" → trailingAmount, None → not supported.
    trailing: str | None = "percent"
    trailing_needs_sl_tp: bool = False
    # GTD needs the expiry as this parameter in ms (None: GTD not supported).
    gtd_param: str | None = None
    # Longest client order id the venue accepts.
    client_id_max_len: int = 36


BINANCE = VenueProfile(
    name="binance",
    client_id_param="newClientOrderId",
    client_id_query_param="origClientOrderId",
    amend_client_id_param="newClientOrderId",
    iceberg_param="icebergQty",
    trailing="percent",
    trailing_needs_sl_tp=True,  # spot: STOP_LOSS(+_LIMIT) with trailingDelta
    gtd_param="goodTillDate",  # futures only; spot rejects GTD
)

GENERIC = VenueProfile(name="generic")

_PROFILES: dict[str, VenueProfile] = {
    "binance": BINANCE,
    "binanceus": BINANCE,
    "binanceusdm": BINANCE,
    "binancecoinm": BINANCE,
}


def profile_for(exchange_id: str) -> VenueProfile:
    return _PROFILES.get(exchange_id, GENERIC)
