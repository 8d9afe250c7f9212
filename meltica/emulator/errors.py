"""Binance error answers: ``{"code": -1022, "msg": "..."}`` with the HTTP status Binance uses.

Codes and messages are Binance's own (``binance-docs/errors.md``), so ccxt's exception mapping
(``binance.exceptions``) turns them into the same ccxt classes it raises against the real venue.
"""

from __future__ import annotations

from typing import Any


class BinanceError(Exception):
    """An error answer. ``status`` is the HTTP status (400 for request errors, 401 for bad keys)."""

    def __init__(self, code: int, msg: str, status: int = 400, data: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg
        self.status = status
        self.data = data
        # extra HTTP headers of the answer (``Retry-After`` on 429/418)
        self.headers: dict[str, str] = {}

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "msg": self.msg}
        if self.data is not None:
            out["data"] = self.data
        return out


# --- constructors for the answers the emulator gives ----------------------------------------------


def internal_error() -> BinanceError:
    return BinanceError(-1001, "Internal error; unable to process your request. Please try again.", 500)


def too_many_requests(limit: str = "6000 request weight per 1 MINUTE") -> BinanceError:
    return BinanceError(
        -1003,
        f"Too much request weight used; current limit is {limit}. "
        "Please use WebSocket Streams for live updates to avoid polling the API.",
        429,
    )


def ip_banned(until_ms: int) -> BinanceError:
    return BinanceError(
        -1003,
        f"Way too much request weight used; IP banned until {until_ms}. "
        "Please use WebSocket Streams for live updates to avoid bans.",
        418,
    )


def timestamp_outside_window() -> BinanceError:
    return BinanceError(-1021, "Timestamp for this request is outside of the recvWindow.")


def timestamp_ahead() -> BinanceError:
    return BinanceError(-1021, "Timestamp for this request was 1000ms ahead of the server's time.")


def invalid_signature() -> BinanceError:
    return BinanceError(-1022, "Signature for this request is not valid.")


def bad_api_key_format() -> BinanceError:
    return BinanceError(-2014, "API-key format invalid.", 401)


def rejected_api_key() -> BinanceError:
    return BinanceError(-2015, "Invalid API-key, IP, or permissions for action.", 401)


def mandatory_param(name: str) -> BinanceError:
    return BinanceError(-1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed.")


def illegal_chars(name: str) -> BinanceError:
    return BinanceError(-1100, f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'.")


def illegal_decimal(name: str) -> BinanceError:
    """A decimal parameter that is not plain digits (a sign, an exponent, spaces): Binance's regex."""
    return BinanceError(
        -1100, f"Illegal characters found in parameter '{name}'; legal range is '^([0-9]{{1,20}})(\\.[0-9]{{1,20}})?$'."
    )


def too_much_precision(name: str) -> BinanceError:
    return BinanceError(-1111, f"Parameter '{name}' has too much precision.")


def invalid_parameter(name: str) -> BinanceError:
    return BinanceError(-1130, f"Data sent for parameter '{name}' is not valid.")


def bad_symbol() -> BinanceError:
    return BinanceError(-1121, "Invalid symbol.")


def invalid_interval() -> BinanceError:
    return BinanceError(-1120, "Invalid interval.")


def invalid_order_type() -> BinanceError:
    return BinanceError(-1116, "Invalid orderType.")


def invalid_side() -> BinanceError:
    return BinanceError(-1117, "Invalid side.")


def invalid_tif() -> BinanceError:
    return BinanceError(-1115, "Invalid timeInForce.")


def filter_failure(name: str) -> BinanceError:
    return BinanceError(-1013, f"Filter failure: {name}")


def new_order_rejected(msg: str) -> BinanceError:
    return BinanceError(-2010, msg)


def iceberg_exceeds_quantity() -> BinanceError:
    return BinanceError(-2010, "IcebergQty exceeds QTY.")


def no_liquidity() -> BinanceError:
    # Binance's message for a quote-quantity market order on an empty book; used for every market order there
    return BinanceError(-2010, "Order book liquidity is less than symbol minimum quantity.")


def cancel_rejected(msg: str = "Unknown order sent.") -> BinanceError:
    return BinanceError(-2011, msg)


def no_such_order() -> BinanceError:
    return BinanceError(-2013, "Order does not exist.")


def invalid_listen_key() -> BinanceError:
    return BinanceError(-1125, "This listenKey does not exist.")


def unknown_endpoint() -> BinanceError:
    # Binance answers an unknown path with an HTML 404; a JSON body keeps clients' parsers simple.
    return BinanceError(-1000, "An unknown error occurred while processing the request.", 404)
