"""The settings schema. Loading, file selection and error reporting are in ``meltica.config.loader``."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from meltica.domain.values import NonNegativeDecimal, PositiveDecimal
from meltica.secrets import Secret, resolve_secret
from meltica.storage.privileges import DEFAULT_RUNTIME_ROLE
from meltica.storage.timeseries import RETENTION_TABLES

Environment = Literal["dev", "paper", "staging", "prod"]
TradingMode = Literal["backtest", "paper", "live"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
ENVIRONMENTS: tuple[str, ...] = ("dev", "paper", "staging", "prod")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ROLE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_SYMBOL = re.compile(r"^[A-Z0-9]+/[A-Z0-9]+(:[A-Z0-9]+(-[0-9A-Z-]+)?)?$")


class _Section(BaseModel):
    # hide_input_in_errors: a rejected value may be a secret; messages name the field only.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class KafkaSettings(_Section):
    bootstrap_servers: str | None = Field(
        default=None, description="host:port[,host:port]; None means the local broker (`meltica infra`)"
    )


_RETENTION_INTERVAL = re.compile(r"^[1-9][0-9]* (day|days|week|weeks|month|months|year|years)$")


class StorageSettings(_Section):
    retention: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "opt-in retention per time-series table, e.g. {trades: '365 days'}: on TimescaleDB, chunks older than "
            "that (counted from now) are dropped by a policy that `meltica db upgrade` sets; nothing is ever "
            "dropped for a table not listed (backfilled history is kept). Plain PostgreSQL keeps every row."
        ),
    )

    @field_validator("retention")
    @classmethod
    def _retention(cls, value: dict[str, str]) -> dict[str, str]:
        for table, keep in value.items():
            if table not in RETENTION_TABLES:
                raise ValueError(f"{table!r} is not a time-series table (one of {', '.join(RETENTION_TABLES)})")
            if not _RETENTION_INTERVAL.match(keep):
                raise ValueError(f"retention of {table} must look like '365 days', '12 weeks', '6 months' or '1 year'")
        return value


class AccountConfig(_Section):
    """One trading account on one venue. Credentials are references: ``env:NAME`` or
    ``encrypted:<token>``; plain text is tolerated outside prod for testnet keys."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    exchange: Annotated[str, Field(min_length=1, max_length=64, description="ccxt exchange id, e.g. binance")]
    sandbox: bool = Field(default=False, description="use the venue's testnet / sandbox")
    api_key: Secret | None = None
    api_secret: Secret | None = None
    password: Secret | None = Field(default=None, description="passphrase, for venues that have one (OKX)")
    emulator_url: str | None = Field(
        default=None,
        description="trade against the local exchange emulator at this URL (http://127.0.0.1:PORT)",
    )

    @field_validator("emulator_url")
    @classmethod
    def _loopback_emulator(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"http://(127\.\d+\.\d+\.\d+|localhost|\[::1\]):\d+/?", value):
            raise ValueError("the emulator runs on loopback: use http://127.0.0.1:PORT")
        return value

    @field_validator("name")
    @classmethod
    def _name_shape(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use letters, digits, '.', '_' and '-' only")
        return value

    @field_validator("exchange")
    @classmethod
    def _exchange_id(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9]+", value):
            raise ValueError("a ccxt exchange id is lower-case letters and digits (e.g. binance, okx)")
        return value

    def credential(
        self, which: Literal["api_key", "api_secret", "password"], *, allow_plaintext: bool
    ) -> Secret | None:
        """The resolved credential (``None`` when not configured); see ``meltica.secrets``."""
        ref: Secret | None = getattr(self, which)
        return None if ref is None else resolve_secret(ref, allow_plaintext=allow_plaintext)


BreachAction = Literal["halt", "reduce_only"]
_HHMM = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


def _percent_below_100(value: Decimal | None) -> Decimal | None:
    if value is not None and value >= 100:
        raise ValueError("a percentage of the equity peak: must be below 100")
    return value


class SymbolRiskLimits(_Section):
    """Limits that can be set per symbol (``risk.symbols.<symbol>``): checked in addition to the account's,
    on the account's orders in that symbol, so they can only tighten; an unset field adds no limit."""

    max_order_quantity: PositiveDecimal | None = Field(default=None, description="base quantity (contracts) per order")
    max_order_notional: PositiveDecimal | None = None
    max_position_notional: PositiveDecimal | None = Field(
        default=None, description="worst-case position per symbol and venue (open orders count as filled)"
    )
    max_open_orders: Annotated[int, Field(ge=0)] | None = None
    price_band_bps: NonNegativeDecimal | None = Field(
        default=None, description="max distance of a limit price from the last trade / mid, basis points"
    )
    orders_per_minute: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="approved orders in any sliding 60 s window"
    )


class StrategyRiskLimits(SymbolRiskLimits):
    """Limits that can be set per strategy (``risk.strategies.<name>``): checked in addition to the
    account's, on the strategy's own orders and positions in the account (position, open orders, order
    rate), so they can only tighten; an unset field adds no limit."""

    strategy_loss_limit: PositiveDecimal | None = Field(
        default=None, description="daily loss of one strategy (realized + unrealized), as a positive amount"
    )
    breach_action: BreachAction | None = None


class AccountRiskLimits(StrategyRiskLimits):
    """Limits that can be set per account (``risk.accounts.<name>``): a field set here replaces the default
    for that account, and is checked on the whole account."""

    max_gross_exposure: PositiveDecimal | None = Field(
        default=None, description="sum of |worst-case position| x price over every symbol and venue of the account"
    )
    max_net_exposure: PositiveDecimal | None = Field(
        default=None, description="|sum of signed worst-case position x price| over the account"
    )
    daily_loss_limit: PositiveDecimal | None = Field(default=None, description="a loss, as a positive amount")
    max_drawdown_pct: PositiveDecimal | None = Field(
        default=None, description="circuit breaker: equity below its peak by this many percent"
    )

    @field_validator("max_drawdown_pct")
    @classmethod
    def _pct(cls, value: Decimal | None) -> Decimal | None:
        return _percent_below_100(value)


class RiskLimits(AccountRiskLimits):
    """Risk limits, in quote currency unless named otherwise. ``None`` means no limit.

    The top-level values are the defaults of every account; ``accounts.<a>`` replaces them field by field
    for one account. That account level is checked on the whole account; ``strategies.<s>`` and
    ``symbols.<sym>`` are checked in addition (on the strategy's orders and positions in the account; on
    the account's orders in the symbol), so a more specific level can only tighten, never loosen. Per-order
    limits (quantity, notional, price band) and ``strategy_loss_limit``: the tightest level applies
    (``max_position_notional_by_symbol`` is the older spelling of ``symbols.<s>.max_position_notional``).
    See ``meltica.risk.limits``.
    """

    max_position_notional_by_symbol: dict[str, PositiveDecimal] = Field(
        default_factory=dict, description="per-symbol max_position_notional, checked in addition to the account's"
    )
    breach_action: BreachAction = Field(
        default="halt", description="kill-switch mode a post-trade breach engages: halt | reduce_only"
    )
    daily_reset_utc: str = Field(default="00:00", description="HH:MM (UTC) at which the daily loss counters reset")
    accounts: dict[str, AccountRiskLimits] = Field(
        default_factory=dict, description="per account name: replace the defaults for that account"
    )
    strategies: dict[str, StrategyRiskLimits] = Field(
        default_factory=dict, description="per strategy: checked in addition to the account's (only tighten)"
    )
    symbols: dict[str, SymbolRiskLimits] = Field(
        default_factory=dict, description="per symbol: checked in addition to the account's (only tighten)"
    )

    @field_validator("daily_reset_utc")
    @classmethod
    def _hhmm(cls, value: str) -> str:
        if not _HHMM.match(value):
            raise ValueError(f"{value!r} is not a UTC time of day as HH:MM (00:00 to 23:59)")
        return value

    @field_validator("accounts", "strategies")
    @classmethod
    def _names(cls, value: dict[str, object]) -> dict[str, object]:
        for name in value:
            if not _NAME.match(name):
                raise ValueError(f"{name!r}: use letters, digits, '.', '_' and '-' only")
        return value

    @field_validator("symbols", "max_position_notional_by_symbol")
    @classmethod
    def _symbol_keys(cls, value: dict[str, object]) -> dict[str, object]:
        for symbol in value:
            if not _SYMBOL.match(symbol):
                raise ValueError(f"{symbol!r} is not a ccxt unified symbol like BTC/USDT or BTC/USDT:USDT")
        return value

    def position_limit(self, symbol: str) -> Decimal | None:
        """The position limit in ``symbol`` of an account without its own: the tightest of the default
        and the symbol's."""
        override = self.symbols.get(symbol)
        candidates = (
            self.max_position_notional,
            self.max_position_notional_by_symbol.get(symbol),
            None if override is None else override.max_position_notional,
        )
        return min((c for c in candidates if c is not None), default=None)


LiveStage = Literal["candles", "strategies", "risk", "execution"]
MARKET_DATA_LINGER_MS = 2.0  # bench/live_pipeline_bench.py: 15.3k → 18.4k trades/s per candles worker
IngestStream = Literal["trades", "klines", "ticker"]
INGEST_STREAMS: tuple[IngestStream, ...] = ("trades", "klines", "ticker")
LIVE_STAGES: tuple[str, ...] = ("candles", "strategies", "risk", "execution")


class LiveInstance(_Section):
    """One strategy instance trading live: a registered strategy with its parameters, on one configured
    account (its exchange is the account's) and one or more of that venue's symbols."""

    instance_id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^:]+$")]
    strategy: Annotated[
        str,
        Field(
            min_length=1,
            description="a registered strategy name (e.g. momentum), path/to/file.py:Class or module:Class",
        ),
    ]
    params: dict[str, object] = Field(default_factory=dict, description="the strategy's parameters")
    account: Annotated[str, Field(min_length=1, description="a name from `accounts`")]
    symbols: Annotated[list[str], Field(min_length=1, description="ccxt unified symbols, e.g. BTC/USDT")]
    timeframe: str = Field(default="1m", description="bar timeframe the strategy's on_bar sees")

    @field_validator("symbols")
    @classmethod
    def _symbols(cls, value: list[str]) -> list[str]:
        for symbol in value:
            if not _SYMBOL.match(symbol):
                raise ValueError(f"{symbol!r} is not a ccxt unified symbol like BTC/USDT or BTC/USDT:USDT")
        return value


class LiveIngest(_Section):
    """Market data from the venues' websockets onto the md.* topics (``meltica live ingest``)."""

    streams: list[IngestStream] = Field(
        default_factory=lambda: list(INGEST_STREAMS), description="what to subscribe per symbol"
    )
    stale_after_s: Annotated[float, Field(gt=0)] = Field(
        default=30.0, description="a market silent this long is stale: new orders on it are refused"
    )
    refetch_gaps: bool = Field(default=True, description="fetch missing closed bars by REST and log the gap")


class LiveWorker(_Section):
    """One stream worker process (``meltica live worker --worker NAME``) and the stages it hosts."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    stages: Annotated[list[LiveStage], Field(min_length=1)]
    producer_linger_ms: Annotated[float, Field(ge=0, le=1000)] | None = Field(
        default=None,
        description="how long the worker's producer waits to fill a batch; default 2 ms for a worker hosting only "
        "candles (about a fifth more trades per second), 0 for one hosting a trading stage (latency first)",
    )

    def linger_ms(self) -> float:
        """The producer linger this worker runs with (``producer_linger_ms`` or its default)."""
        if self.producer_linger_ms is not None:
            return self.producer_linger_ms
        return MARKET_DATA_LINGER_MS if set(self.stages) == {"candles"} else 0.0


def _default_workers() -> list[LiveWorker]:
    return [LiveWorker(name="pipeline", stages=["strategies", "risk", "execution"])]


class LiveReconcile(_Section):
    at_start: bool = Field(default=True, description="reconcile every account before the first order")
    after_reconnect: bool = Field(default=True, description="reconcile after every user-stream reconnect")
    interval_s: Annotated[float, Field(ge=0)] = Field(default=900.0, description="0: no periodic reconciliation")


class LiveSettings(_Section):
    """The live deployment (``meltica live start --config FILE``): which strategy instances trade, how the
    stages are split into processes, and what runs beside them. Accounts, credentials and risk limits are
    the file's top-level ``accounts`` and ``risk``."""

    topic_prefix: str = Field(default="live.", description="Kafka topic prefix of this deployment")
    instances: list[LiveInstance] = Field(default_factory=list)
    ingest: LiveIngest = Field(default_factory=LiveIngest)
    workers: list[LiveWorker] = Field(default_factory=_default_workers)
    sinks: bool = Field(default=True, description="store market data, orders, fills and positions in the database")
    reconcile: LiveReconcile = Field(default_factory=LiveReconcile)
    cancel_all_on_stop: bool = Field(default=False, description="cancel every open order when `live start` stops")
    state_dir: str | None = Field(default=None, description="logs and pid files; default <MELTICA_STATE_DIR>/live")

    @field_validator("instances")
    @classmethod
    def _unique_instances(cls, value: list[LiveInstance]) -> list[LiveInstance]:
        ids = [i.instance_id for i in value]
        if len(set(ids)) != len(ids):
            raise ValueError("instance ids must be unique")
        return value

    @field_validator("workers")
    @classmethod
    def _unique_workers(cls, value: list[LiveWorker]) -> list[LiveWorker]:
        names = [w.name for w in value]
        if len(set(names)) != len(names):
            raise ValueError("worker names must be unique")
        return value


class MelticaSettings(BaseSettings):
    """Everything configurable. Sources, highest priority first: ``MELTICA_*`` environment variables
    (nested with ``__``: ``MELTICA_RISK__MAX_ORDER_NOTIONAL``), then the YAML file."""

    model_config = SettingsConfigDict(
        env_prefix="MELTICA_",
        env_nested_delimiter="__",
        env_ignore_empty=True,  # `MELTICA_X=` in a shell means "unset", not "empty string"
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
    )

    environment: Environment = "dev"
    trading_mode: TradingMode = "backtest"
    database_url: Secret | None = Field(
        default=None,
        description="PostgreSQL URL of the runtime role (every command but `meltica db`); None means the local "
        "infrastructure (`meltica infra`)",
    )
    database_migration_url: Secret | None = Field(
        default=None,
        description="PostgreSQL URL of the owner (migration) role, used by `meltica db`; None: `database_url` in "
        "dev and paper, required in staging and prod when `database_url` is set",
    )
    database_runtime_role: str = Field(
        default=DEFAULT_RUNTIME_ROLE,
        description="the role the migrations grant the application's rights to (the user of `database_url`)",
    )
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings, description="time-series storage")
    prefect_api_url: str | None = Field(default=None, description="None means Prefect's ephemeral API")
    reports_url: str = Field(
        default="http://127.0.0.1:8765",
        pattern=r"^https?://[^\s/]+(/\S*)?$",
        description="base URL of `meltica reports serve` as the browser reaches it: Prefect artifacts link the "
        "stored backtest reports under it",
    )
    accounts: list[AccountConfig] = Field(default_factory=list)
    risk: RiskLimits = Field(default_factory=RiskLimits)
    symbols: list[str] = Field(default_factory=list, description="ccxt unified symbols, e.g. BTC/USDT")
    log_level: LogLevel = "INFO"
    live: LiveSettings = Field(default_factory=LiveSettings, description="live trading (`meltica live start`)")
    strategy_paths: list[Path] = Field(
        default_factory=list,
        description="directories of your own strategies: each *.py file is imported and its @register_strategy "
        "classes are usable by name (relative paths from the current directory)",
    )

    @field_validator("database_runtime_role")
    @classmethod
    def _role_name(cls, value: str) -> str:
        if not _ROLE.match(value):
            raise ValueError("a role name is lower-case letters, digits and '_', starting with a letter or '_'")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("symbols")
    @classmethod
    def _symbols(cls, value: list[str]) -> list[str]:
        for symbol in value:
            if not _SYMBOL.match(symbol):
                raise ValueError(f"{symbol!r} is not a ccxt unified symbol like BTC/USDT or BTC/USDT:USDT")
        if len(set(value)) != len(value):
            raise ValueError("a symbol is listed twice")
        return value

    @field_validator("accounts")
    @classmethod
    def _unique_accounts(cls, value: list[AccountConfig]) -> list[AccountConfig]:
        names = [account.name for account in value]
        if len(set(names)) != len(names):
            raise ValueError("account names must be unique")
        return value

    def account(self, name: str) -> AccountConfig:
        for account in self.accounts:
            if account.name == name:
                return account
        raise KeyError(name)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment variables override the file (passed as init values); no .env or secrets dir.
        return (env_settings, init_settings)
