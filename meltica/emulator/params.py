"""Request parameters as Binance reads them: mandatory, decimal, integer and symbol-list parameters."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from meltica.emulator import errors
from meltica.emulator.config import EmulatorAccount
from meltica.emulator.symbols import SymbolSpec

Params = dict[str, str]
# A REST endpoint: the request, its query and form parameters, the calling account (signed and key-only
# endpoints) → the JSON answer.
Handler = Callable[[web.Request, Params, "EmulatorAccount | None"], Awaitable[Any]]
Route = tuple[str, str, Handler]

_DECIMAL_PARAM = re.compile(r"^([0-9]{1,20})(\.[0-9]{1,20})?$")


def required(params: Params, name: str) -> str:
    value = params.get(name)
    if value is None or value == "":
        raise errors.mandatory_param(name)
    return value


def decimal_param(params: Params, name: str, max_decimals: int = 8) -> Decimal | None:
    """A decimal parameter as Binance reads it: plain digits (no sign, exponent or spaces: -1100), at most
    ``max_decimals`` significant decimals (the asset's precision: -1111; trailing zeros do not count)."""
    value = params.get(name)
    if value is None or value == "":
        return None
    if not _DECIMAL_PARAM.match(value):
        raise errors.illegal_decimal(name)
    try:
        out = Decimal(value)
    except InvalidOperation:
        raise errors.illegal_decimal(name) from None
    exponent = out.normalize().as_tuple().exponent
    assert isinstance(exponent, int)  # the regex admits finite numbers only
    if -exponent > max_decimals:
        raise errors.too_much_precision(name)
    return out


def opt_int(params: Params, name: str) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise errors.illegal_chars(name) from None


def int_param(params: Params, name: str, default: int) -> int:
    value = opt_int(params, name)
    return default if value is None else value


def symbol_list(params: Params) -> list[str] | None:
    if params.get("symbol"):
        return [params["symbol"].upper()]
    raw = params.get("symbols")
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise errors.illegal_chars("symbols") from None
    if not isinstance(parsed, list):
        raise errors.illegal_chars("symbols")
    return [str(s).upper() for s in parsed]


def spec_of(specs: Mapping[str, SymbolSpec], params: Params) -> SymbolSpec:
    """The listed symbol the request names (``symbol``, mandatory)."""
    symbol = required(params, "symbol").upper()
    spec = specs.get(symbol)
    if spec is None:
        raise errors.bad_symbol()
    return spec
