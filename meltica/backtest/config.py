"""``BacktestConfig``: what one backtest run is, validated before anything starts (DESIGN.md §9).

Every error is a ``ConfigurationError`` whose ``field`` names the offending key (``params.fast`` for a
strategy parameter). Fees and slippage are in basis points (10 bps = 0.1 %); the fill model they build is
described in ``meltica/backtest/engine.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from meltica.domain import Instrument, MarketType, Timeframe
from meltica.errors import ConfigurationError
from meltica.risk import RiskConfig
from meltica.sim.config import SimulatedVenueSettings
from meltica.strategies import get_strategy, validate_params

_ZERO = Decimal(0)

# Precision of the markets the shipped data and the examples use (Binance, early 2022). Anything else
# needs ``instrument=`` (or ``--tick-size`` / ``--step-size`` on the CLI).
_KNOWN: dict[str, dict[str, Any]] = {
    "BTC/USDT": {"tick_size": "0.01", "step_size": "0.00001", "min_quantity": "0.00001", "min_notional": "5"},
    "ETH/USDT": {"tick_size": "0.01", "step_size": "0.0001", "min_quantity": "0.0001", "min_notional": "5"},
    "BTC/USDT:USDT": {
        "tick_size": "0.01",
        "step_size": "0.001",
        "min_quantity": "0.001",
        "min_notional": "5",
        "market_type": MarketType.SWAP,
        "settle": "USDT",
    },
    "ETH/USDT:USDT": {
        "tick_size": "0.01",
        "step_size": "0.001",
        "min_quantity": "0.001",
        "min_notional": "5",
        "market_type": MarketType.SWAP,
        "settle": "USDT",
    },
}


def default_instrument(exchange: str, symbol: str) -> Instrument:
    """The built-in precision for ``symbol`` (see ``_KNOWN``), else a fine generic one (1e-8 steps)."""
    base, _, rest = symbol.partition("/")
    quote, _, settle = rest.partition(":")
    if not base or not quote:
        raise ConfigurationError(f"{symbol!r} is not a unified symbol like BTC/USDT", field="symbol")
    known = _KNOWN.get(symbol)
    fields: dict[str, Any] = (
        dict(known)
        if known is not None
        else {
            "tick_size": "0.00000001",
            "step_size": "0.00000001",
            "market_type": MarketType.SWAP if settle else MarketType.SPOT,
            "settle": settle or None,
        }
    )
    return Instrument(exchange=exchange, symbol=symbol, base=base, quote=quote, **fields)


class BacktestConfig(SimulatedVenueSettings):
    """One backtest: strategy and parameters, market, money, fill model and (optional) risk limits.

    The simulated account's settings (balances, fees, slippage, latency, volume share, fill on touch) and
    their conversion into the fee schedule and fill model are ``SimulatedVenueSettings``'."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    strategy: str = Field(min_length=1, description="registered strategy name")
    params: dict[str, Any] = Field(default_factory=dict, description="strategy parameters")
    instance_id: str | None = Field(None, description="strategy instance id (default: the strategy name)")
    account: str = Field("backtest", min_length=1)
    exchange: str = Field("binance", min_length=1)
    symbol: str = Field("BTC/USDT", min_length=3)
    timeframe: str = "1m"
    start: datetime | None = Field(None, description="first bar (inclusive) when reading the database")
    end: datetime | None = Field(None, description="end (exclusive) when reading the database")
    initial_balances: dict[str, Decimal] = Field(
        default_factory=dict, description="asset -> amount; default 10,000 of the quote currency"
    )
    risk: RiskConfig | None = None
    instrument: Instrument | None = None

    @field_validator("timeframe")
    @classmethod
    def _timeframe(cls, value: str) -> str:
        Timeframe.parse(value)
        return value

    @field_validator("initial_balances")
    @classmethod
    def _balances(cls, value: dict[str, Decimal]) -> dict[str, Decimal]:
        for asset, amount in value.items():
            if amount < 0:
                raise ValueError(f"{asset}: a balance cannot be negative")
        return value

    @model_validator(mode="after")
    def _check(self) -> BacktestConfig:
        if self.instrument is not None and self.instrument.symbol != self.symbol:
            raise ValueError(f"instrument is for {self.instrument.symbol}, the run trades {self.symbol}")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError("end must be after start")
        return self

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def create(cls, data: Mapping[str, Any] | None = None, /, **values: Any) -> BacktestConfig:
        """Validated config from a mapping and/or keywords; ``ConfigurationError`` naming the bad field.
        The strategy's parameters are validated against its ``Params`` too (``field='params.<name>'``)."""
        merged = {**(data or {}), **values}
        merged["params"] = _bind_symbol(merged.get("strategy"), merged.get("params") or {}, merged.get("symbol"))
        try:
            config = cls.model_validate(merged)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or None
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(config)'}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigurationError(
                f"invalid backtest configuration: {problems}", field=field, source="backtest"
            ) from None
        config.refuse_impossible_quantity(config.validated_params())
        return config

    def refuse_impossible_quantity(self, params: BaseModel) -> None:
        """A ``quantity`` parameter below the market's lot size makes every order invalid: refused up front."""
        quantity = getattr(params, "quantity", None)
        if not isinstance(quantity, Decimal):
            return
        market = self.market()
        rounded = market.round_quantity(quantity)
        floor = max(market.min_quantity or _ZERO, market.step_size or _ZERO)
        if rounded <= 0 or (market.min_quantity is not None and rounded < market.min_quantity):
            raise ConfigurationError(
                f"params.quantity {quantity} is below {self.symbol}'s smallest order ({floor}): every order "
                "would be refused",
                field="params.quantity",
                source="backtest",
            )

    def validated_params(self) -> BaseModel:
        """The strategy's parameters checked against its model (registered strategies only)."""
        try:
            return validate_params(self.strategy, self.params)
        except ConfigurationError as exc:
            field = exc.field if exc.field in (None, "strategy") else f"params.{exc.field}"
            raise ConfigurationError(str(exc), field=field or "params", source="backtest") from None

    # --- derived -----------------------------------------------------------------------------

    @property
    def strategy_instance(self) -> str:
        if self.instance_id or ":" not in self.strategy:
            return self.instance_id or self.strategy

        # the registered name of a ``file.py:Class`` reference: instance ids carry no ':' or path
        return get_strategy(self.strategy).name

    def market(self) -> Instrument:
        return self.instrument if self.instrument is not None else default_instrument(self.exchange, self.symbol)

    def balances(self) -> dict[str, Decimal]:
        if self.initial_balances:
            return dict(self.initial_balances)
        return {self.market().quote: Decimal(10_000)}

    def effective_params(self) -> dict[str, Any]:
        """Every strategy parameter the run used, defaults included (JSON data)."""
        dumped: dict[str, Any] = self.validated_params().model_dump(mode="json")
        return dumped

    def fill_model_info(self, bar: timedelta | None = None) -> dict[str, Any]:
        """The fill model as stored with the result (``BacktestResult.fill_model``); ``bar`` (the bar
        length) lets the description say when a latency moves fills a whole bar later."""
        return {
            "description": self.fill_model_description(bar),
            "maker_fee_bps": self.maker_fee_bps,
            "taker_fee_bps": self.taker_fee_bps,
            "fee_asset": self.fee_asset,
            "slippage_bps": self.slippage_bps,
            "latency_ms": self.latency_ms,
            "bar_volume_share": self.bar_volume_share,
            "fill_on_touch": self.fill_on_touch,
            "release": "next bar open after decision + latency",
        }

    def fill_model_description(self, bar: timedelta | None = None) -> str:
        """The fill model in one sentence, for the summary and the report."""
        parts = [
            f"taker {self.taker_fee_bps} bps / maker {self.maker_fee_bps} bps fees",
            f"{self.slippage_bps} bps slippage",
        ]
        if self.bar_volume_share is not None:
            parts.append(f"at most {self.bar_volume_share} of a bar's volume")
        latency = timedelta(milliseconds=self.latency_ms)
        if self.latency_ms == 0:
            parts.append("a decision on a bar's close fills from the next bar's open")
        elif bar is not None and latency <= bar:
            parts.append(
                f"latency {self.latency_ms} ms (up to one {bar} bar) moves every fill a whole bar later: a "
                "decision on a bar's close fills from the open of the bar after next"
            )
        else:
            parts.append(f"latency {self.latency_ms} ms: a decision fills from the first bar open after it arrives")
        parts.append("stops trigger on the conservative intrabar path")
        return "; ".join(parts)


def _bind_symbol(strategy: Any, params: Mapping[str, Any], symbol: Any) -> dict[str, Any]:
    """A strategy with a ``symbol`` parameter trades the backtest's symbol unless told otherwise; told a
    different one, it would never see a bar: that is a configuration error, not a silent empty run."""
    bound = dict(params)
    if not isinstance(strategy, str) or not isinstance(symbol, str):
        return bound

    try:
        fields = get_strategy(strategy).Params.model_fields
    except ConfigurationError:
        return bound  # unknown strategy: reported by validated_params()
    if "symbol" not in fields:
        return bound
    given = bound.setdefault("symbol", symbol)
    if given != symbol:
        raise ConfigurationError(
            f"params.symbol {given!r} is not the backtest's symbol {symbol!r}: the strategy would never trade",
            field="params.symbol",
            source="backtest",
        )
    return bound
