"""SQLAlchemy 2 table definitions: the one description of Meltica's database schema.

Rules (DESIGN.md §4, §6):
* money and quantities are ``NUMERIC`` (unconstrained scale: venues differ), mapped to ``Decimal``;
* time is ``TIMESTAMPTZ`` in UTC;
* facts that have happened (order events, fills, risk decisions, discrepancies) are append-only —
  triggers installed by the migrations refuse ``UPDATE``, ``DELETE`` and ``TRUNCATE`` on them;
* current state (orders, strategy state) is kept next to the facts as snapshots;
* every unique key of a time-series table includes its time column, so the table can become a
  TimescaleDB hypertable unchanged (see ``meltica.storage.timeseries``).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

# Deterministic constraint names, so Alembic migrations can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _ts(name: str = "ts", *, nullable: bool = False) -> Column[datetime]:
    return Column(name, DateTime(timezone=True), nullable=nullable)


def _money(name: str, *, nullable: bool = False) -> Column[Decimal]:
    return Column(name, Numeric(asdecimal=True), nullable=nullable)


def _created_at() -> Column[datetime]:
    return Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now())


# --- market data (time series) ---------------------------------------------------------------

candles = Table(
    "candles",
    metadata,
    Column("exchange", Text, nullable=False),
    Column("symbol", Text, nullable=False),
    Column("timeframe", Text, nullable=False),
    _ts(),
    _money("open"),
    _money("high"),
    _money("low"),
    _money("close"),
    _money("volume"),
    # The natural key: reloading the same bars adds nothing.
    PrimaryKeyConstraint("exchange", "symbol", "timeframe", "ts"),
    CheckConstraint("low <= high AND low <= open AND low <= close", name="low_is_lowest"),
    CheckConstraint("high >= open AND high >= close", name="high_is_highest"),
    CheckConstraint("volume >= 0", name="volume_not_negative"),
)

trades = Table(
    "trades",
    metadata,
    Column("exchange", Text, nullable=False),
    Column("symbol", Text, nullable=False),
    _ts(),
    Column("trade_id", Text, nullable=False),
    _money("price"),
    _money("amount"),
    Column("side", Text, nullable=True),
    PrimaryKeyConstraint("exchange", "symbol", "ts", "trade_id"),
    CheckConstraint("side IS NULL OR side IN ('buy', 'sell')", name="side_known"),
    CheckConstraint("price > 0 AND amount > 0", name="positive"),
)

order_book_snapshots = Table(
    "order_book_snapshots",
    metadata,
    Column("exchange", Text, nullable=False),
    Column("symbol", Text, nullable=False),
    _ts(),
    Column("sequence", BigInteger, nullable=False, server_default=text("0")),
    # Parallel arrays keep prices NUMERIC (DESIGN.md §4) instead of JSON strings.
    Column("bid_prices", ARRAY(Numeric), nullable=False),
    Column("bid_sizes", ARRAY(Numeric), nullable=False),
    Column("ask_prices", ARRAY(Numeric), nullable=False),
    Column("ask_sizes", ARRAY(Numeric), nullable=False),
    PrimaryKeyConstraint("exchange", "symbol", "ts", "sequence"),
    CheckConstraint(
        "cardinality(bid_prices) = cardinality(bid_sizes) AND cardinality(ask_prices) = cardinality(ask_sizes)",
        name="levels_paired",
    ),
)

# --- orders and fills ------------------------------------------------------------------------

ORDER_STATUSES = (
    "new",
    "pending_submit",
    "open",
    "partially_filled",
    "filled",
    "pending_cancel",
    "cancelled",
    "rejected",
    "expired",
)
_status_list = ", ".join(f"'{s}'" for s in ORDER_STATUSES)

orders = Table(
    "orders",
    metadata,
    # Derived deterministically from the intent id and stored before the order is sent (DESIGN.md §4).
    Column("client_order_id", Text, primary_key=True),
    Column("intent_id", Text, nullable=False),
    Column("account", Text, nullable=False),
    Column("strategy", Text, nullable=True),
    Column("exchange", Text, nullable=False),
    Column("symbol", Text, nullable=False),
    Column("side", Text, nullable=False),
    Column("order_type", Text, nullable=False),
    Column("time_in_force", Text, nullable=True),
    _money("quantity"),
    _money("price", nullable=True),
    _money("trigger_price", nullable=True),
    _money("display_quantity", nullable=True),
    Column("params", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("status", Text, nullable=False),
    Column("exchange_order_id", Text, nullable=True),
    _money("filled_quantity"),
    _money("average_fill_price", nullable=True),
    Column("last_event_seq", BigInteger, nullable=False, server_default=text("0")),
    Column("post_only", Boolean, nullable=False, server_default=text("false")),
    Column("reduce_only", Boolean, nullable=False, server_default=text("false")),
    Column("expire_at", DateTime(timezone=True), nullable=True),
    # Held locally (stop/trailing/OCO legs the venue lacks) until triggered: see emulated_orders.
    Column("emulated", Boolean, nullable=False, server_default=text("false")),
    Column("parent_client_order_id", Text, nullable=True),
    Column("order_list_id", Text, nullable=True),
    _created_at(),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("intent_id"),
    CheckConstraint("side IN ('buy', 'sell')", name="side_known"),
    CheckConstraint(f"status IN ({_status_list})", name="status_known"),
    CheckConstraint("quantity > 0 AND filled_quantity >= 0 AND filled_quantity <= quantity", name="filled_bounds"),
)
Index("ix_orders_open", orders.c.account, orders.c.exchange, orders.c.status)
Index("ix_orders_exchange_order_id", orders.c.exchange, orders.c.exchange_order_id)
Index("ix_orders_order_list", orders.c.order_list_id)

# OCO, bracket and algorithmic parents (TWAP): one row per list, its orders point at it.
order_lists = Table(
    "order_lists",
    metadata,
    Column("list_id", Text, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("account", Text, nullable=False),
    Column("strategy", Text, nullable=True),
    Column("status", Text, nullable=False, server_default=text("'active'")),
    Column("params", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    _created_at(),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("kind IN ('oco', 'bracket', 'twap')", name="kind_known"),
)

# The local trigger state of an emulated order (trailing peak, activation), so it survives a restart.
emulated_orders = Table(
    "emulated_orders",
    metadata,
    Column("client_order_id", Text, ForeignKey("orders.client_order_id"), primary_key=True),
    Column("state", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("active", Boolean, nullable=False, server_default=text("true")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

order_events = Table(
    "order_events",
    metadata,
    Column("event_id", UUID(as_uuid=True), primary_key=True),
    Column("client_order_id", Text, ForeignKey("orders.client_order_id"), nullable=False),
    Column("seq", BigInteger, nullable=False),
    _ts(),
    Column("event_type", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("payload", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("recorded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("client_order_id", "seq"),
    CheckConstraint(f"status IN ({_status_list})", name="status_known"),
)

fills = Table(
    "fills",
    metadata,
    Column("exchange", Text, nullable=False),
    Column("account", Text, nullable=False),
    Column("trade_id", Text, nullable=False),
    Column("client_order_id", Text, nullable=True),
    Column("exchange_order_id", Text, nullable=True),
    Column("strategy", Text, nullable=True),
    Column("symbol", Text, nullable=False),
    Column("side", Text, nullable=False),
    _money("price"),
    _money("quantity"),
    _money("fee"),
    Column("fee_currency", Text, nullable=True),
    Column("liquidity", Text, nullable=True),
    _ts(),
    Column("recorded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # A redelivered fill writes nothing twice. The side is part of a fill's identity: two orders of one
    # account that trade with each other make one venue trade (one trade id) with a buy and a sell leg.
    PrimaryKeyConstraint("exchange", "account", "trade_id", "side"),
    CheckConstraint("side IN ('buy', 'sell')", name="side_known"),
    CheckConstraint("liquidity IS NULL OR liquidity IN ('maker', 'taker')", name="liquidity_known"),
    CheckConstraint("price > 0 AND quantity > 0", name="positive"),
)
Index("ix_fills_order", fills.c.client_order_id)
Index("ix_fills_ts", fills.c.account, fills.c.ts)

# --- portfolio snapshots (time series) -------------------------------------------------------

position_snapshots = Table(
    "position_snapshots",
    metadata,
    Column("account", Text, nullable=False),
    Column("exchange", Text, nullable=False),
    Column("symbol", Text, nullable=False),
    # '' is the account-level ledger; a strategy name is its sub-ledger.
    Column("strategy", Text, nullable=False, server_default=text("''")),
    _ts(),
    _money("quantity"),
    _money("average_entry_price", nullable=True),
    _money("realized_pnl"),
    _money("unrealized_pnl", nullable=True),
    _money("fees"),
    _money("mark_price", nullable=True),
    PrimaryKeyConstraint("account", "exchange", "symbol", "strategy", "ts"),
)

balance_snapshots = Table(
    "balance_snapshots",
    metadata,
    Column("account", Text, nullable=False),
    Column("exchange", Text, nullable=False),
    Column("asset", Text, nullable=False),
    _ts(),
    _money("free"),
    _money("locked"),
    _money("total"),
    Column("source", Text, nullable=False, server_default=text("'local'")),
    PrimaryKeyConstraint("account", "exchange", "asset", "ts", "source"),
    CheckConstraint("total = free + locked", name="total_is_sum"),
)

# --- strategies and risk ---------------------------------------------------------------------

strategy_state = Table(
    "strategy_state",
    metadata,
    Column("instance_id", Text, primary_key=True),
    Column("strategy", Text, nullable=False),
    Column("params", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("state", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    # Optimistic concurrency: a writer states the version it read.
    Column("version", BigInteger, nullable=False, server_default=text("0")),
    Column("status", Text, nullable=False, server_default=text("'stopped'")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

risk_events = Table(
    "risk_events",
    metadata,
    Column("event_id", UUID(as_uuid=True), primary_key=True),
    _ts(),
    Column("account", Text, nullable=True),
    Column("strategy", Text, nullable=True),
    Column("symbol", Text, nullable=True),
    Column("intent_id", Text, nullable=True),
    # approved | rejected | breach | kill_switch_on | kill_switch_off | ...
    Column("decision", Text, nullable=False),
    Column("rule", Text, nullable=True),
    Column("reason", Text, nullable=True),
    Column("details", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("actor", Text, nullable=True),
)
Index("ix_risk_events_ts", risk_events.c.ts)
Index("ix_risk_events_intent", risk_events.c.intent_id)

# Current kill-switch state per scope ('global', 'account:<name>', 'strategy:<name>'); every change is
# also appended to risk_events.
kill_switch_state = Table(
    "kill_switch_state",
    metadata,
    Column("scope", Text, primary_key=True),
    Column("mode", Text, nullable=False),
    Column("reason", Text, nullable=True),
    Column("actor", Text, nullable=True),
    Column("changed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("mode IN ('off', 'halt', 'reduce_only')", name="mode_known"),
)

# Small durable risk state (equity peak for the drawdown breaker, daily PnL anchor), by key.
risk_state = Table(
    "risk_state",
    metadata,
    Column("key", Text, primary_key=True),
    Column("value", JSONB, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# --- backtests -------------------------------------------------------------------------------

backtest_runs = Table(
    "backtest_runs",
    metadata,
    Column("run_id", UUID(as_uuid=True), primary_key=True),
    Column("strategy", Text, nullable=False),
    Column("params", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("exchange", Text, nullable=True),
    Column("symbols", ARRAY(Text), nullable=False),
    Column("timeframe", Text, nullable=True),
    Column("data_start", DateTime(timezone=True), nullable=True),
    Column("data_end", DateTime(timezone=True), nullable=True),
    Column("fill_model", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("code_version", Text, nullable=True),
    Column("sweep_id", UUID(as_uuid=True), nullable=True),
    Column("status", Text, nullable=False, server_default=text("'running'")),
    Column("error", Text, nullable=True),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("finished_at", DateTime(timezone=True), nullable=True),
)

backtest_metrics = Table(
    "backtest_metrics",
    metadata,
    Column("run_id", UUID(as_uuid=True), ForeignKey("backtest_runs.run_id", ondelete="CASCADE"), nullable=False),
    Column("name", Text, nullable=False),
    _money("value", nullable=True),
    PrimaryKeyConstraint("run_id", "name"),
)

backtest_equity = Table(
    "backtest_equity",
    metadata,
    Column("run_id", UUID(as_uuid=True), ForeignKey("backtest_runs.run_id", ondelete="CASCADE"), nullable=False),
    _ts(),
    _money("equity"),
    _money("cash"),
    _money("position_value"),
    PrimaryKeyConstraint("run_id", "ts"),
)

backtest_trades = Table(
    "backtest_trades",
    metadata,
    Column("run_id", UUID(as_uuid=True), ForeignKey("backtest_runs.run_id", ondelete="CASCADE"), nullable=False),
    Column("trade_no", Integer, nullable=False),
    Column("symbol", Text, nullable=False),
    Column("side", Text, nullable=False),
    Column("entry_ts", DateTime(timezone=True), nullable=False),
    Column("exit_ts", DateTime(timezone=True), nullable=True),
    _money("entry_price"),
    _money("exit_price", nullable=True),
    _money("quantity"),
    _money("pnl", nullable=True),
    _money("fees"),
    PrimaryKeyConstraint("run_id", "trade_no"),
)

# The run's orders as they ended and its fills. Kept apart from the live ``orders``/``fills`` (facts of real
# accounts). ``seq`` is the position in the run, so a loaded result lists them in the order it was saved.
backtest_orders = Table(
    "backtest_orders",
    metadata,
    Column("run_id", UUID(as_uuid=True), ForeignKey("backtest_runs.run_id", ondelete="CASCADE"), nullable=False),
    Column("client_order_id", Text, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("intent_id", Text, nullable=False),
    Column("symbol", Text, nullable=False),
    Column("side", Text, nullable=False),
    Column("order_type", Text, nullable=False),
    _money("quantity"),
    _money("price", nullable=True),
    _money("trigger_price", nullable=True),
    Column("status", Text, nullable=False),
    _money("filled_quantity"),
    _money("average_fill_price", nullable=True),
    Column("reason", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("run_id", "client_order_id"),
)

backtest_fills = Table(
    "backtest_fills",
    metadata,
    Column("run_id", UUID(as_uuid=True), ForeignKey("backtest_runs.run_id", ondelete="CASCADE"), nullable=False),
    Column("trade_id", Text, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("client_order_id", Text, nullable=False),
    Column("exchange_order_id", Text, nullable=True),
    Column("exchange", Text, nullable=False),
    Column("symbol", Text, nullable=False),
    Column("side", Text, nullable=False),
    _money("price"),
    _money("quantity"),
    _money("fee"),
    Column("fee_currency", Text, nullable=True),
    Column("liquidity", Text, nullable=True),
    _ts(),
    PrimaryKeyConstraint("run_id", "trade_id"),
)

# --- reports ---------------------------------------------------------------------------------

# Reports served over HTTP (`meltica reports serve`): a backtest's report.html and its charts, stored when the
# run is made so a link in a Prefect artifact keeps working whatever happens to the worker's disk. Written
# once per report id (a backtest's run id), never changed: the runtime role only reads and inserts them.
reports = Table(
    "reports",
    metadata,
    Column("report_id", UUID(as_uuid=True), primary_key=True),
    Column("kind", Text, nullable=False),  # backtest | risk
    Column("title", Text, nullable=False),
    _created_at(),
)

report_files = Table(
    "report_files",
    metadata,
    Column("report_id", UUID(as_uuid=True), ForeignKey("reports.report_id", ondelete="CASCADE"), nullable=False),
    Column("name", Text, nullable=False),  # a plain file name: report.html, equity.png, ...
    Column("content_type", Text, nullable=False),
    Column("body", LargeBinary, nullable=False),
    PrimaryKeyConstraint("report_id", "name"),
    CheckConstraint("name ~ '^[A-Za-z0-9][A-Za-z0-9._-]*$'", name="name_plain"),
)

# --- reconciliation --------------------------------------------------------------------------

reconciliation_runs = Table(
    "reconciliation_runs",
    metadata,
    Column("run_id", UUID(as_uuid=True), primary_key=True),
    Column("account", Text, nullable=False),
    Column("exchange", Text, nullable=False),
    Column("trigger", Text, nullable=False, server_default=text("'schedule'")),
    Column("status", Text, nullable=False, server_default=text("'running'")),
    Column("summary", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("finished_at", DateTime(timezone=True), nullable=True),
)

reconciliation_discrepancies = Table(
    "reconciliation_discrepancies",
    metadata,
    Column("discrepancy_id", UUID(as_uuid=True), primary_key=True),
    Column(
        "run_id",
        UUID(as_uuid=True),
        ForeignKey("reconciliation_runs.run_id", ondelete="CASCADE"),
        nullable=False,
    ),
    # missing_locally | missing_on_venue | state_mismatch | quantity_mismatch | balance_drift
    Column("kind", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("local", JSONB, nullable=True),
    Column("venue", JSONB, nullable=True),
    Column("action", Text, nullable=True),
    _ts(),
)
Index("ix_reconciliation_discrepancies_run", reconciliation_discrepancies.c.run_id)

# --- credentials -----------------------------------------------------------------------------

credentials = Table(
    "credentials",
    metadata,
    Column("account", Text, primary_key=True),
    Column("exchange", Text, nullable=False),
    # Ciphertexts only (Fernet tokens); the master key never touches the database.
    Column("api_key_ciphertext", LargeBinary, nullable=False),
    Column("api_secret_ciphertext", LargeBinary, nullable=False),
    Column("passphrase_ciphertext", LargeBinary, nullable=True),
    # A short hash prefix of the API key, so an operator can tell keys apart without seeing them.
    Column("key_fingerprint", Text, nullable=False),
    _created_at(),
    Column("rotated_at", DateTime(timezone=True), nullable=True),
)

# Tables whose rows are facts: never updated in place (the migration installs a guard trigger).
APPEND_ONLY_TABLES = ("order_events", "fills", "risk_events", "reconciliation_discrepancies")
