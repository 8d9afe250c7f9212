"""What ``meltica live status`` shows about a live deployment, read from the database (and optionally the
control topic). Every figure comes from stored facts, so the view is the same from any machine:

* **open orders** per account: ``orders`` rows in a non-terminal status;
* **positions and PnL**: the account's ``fills`` replayed, in time order, through the same
  :class:`~meltica.portfolio.Portfolio` the workers use (average cost; realized PnL per strategy = its
  sub-ledger), valued at a **mark**: the later of the market's last stored candle close (at the bar's
  close time) and the mark of the account's latest ``position_snapshots`` row for it. The snapshot's
  quantity is shown beside the one from fills, so a disagreement is visible;
* **risk utilisation**: the worst-case exposure the risk engine measures (open orders counted as filled,
  at the mark, else the order price, else the entry price) against ``risk.max_gross_exposure`` /
  ``max_net_exposure`` / ``max_position_notional``, and open orders against ``max_open_orders`` (limits
  resolved per account as the engine resolves them);
* **kill switch**: ``kill_switch_state``, every scope, and the effective mode per strategy instance;
* **market data** per stream (exchange, symbol of the instances): the latest stored candle and trade and
  their age against ``live.ingest.stale_after_s``; market status messages from the control topic when a
  worker publishes them (:func:`market_status_messages`, optional).

Decimals are returned as strings (exact), times as ISO-8601 UTC.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, and_, func, select

from meltica.config.settings import MelticaSettings
from meltica.domain import TERMINAL_STATUSES, Fill, OrderStatus, Side
from meltica.domain.timeframe import Timeframe
from meltica.portfolio.portfolio import Portfolio
from meltica.risk.kill_switch import KillSwitch, KillSwitchState
from meltica.risk.limits import Limit, resolve_limits
from meltica.risk.store import KillSwitchStore
from meltica.storage.tables import candles, fills, orders, position_snapshots, trades

UNATTRIBUTED = "unattributed"
"""The strategy a fill without one (adopted from the venue by reconciliation) is booked under."""

_ZERO = Decimal(0)


def _dec(value: Decimal | None) -> str | None:
    return None if value is None else format(value.normalize(), "f")


def _iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.isoformat().replace("+00:00", "Z")


def _ratio(used: Decimal, limit: Limit | None) -> str | None:
    if limit is None or limit.value == 0:
        return None
    return str((used / limit.value).quantize(Decimal("0.0001")))


def _limit_view(limit: Limit | None, used: Decimal) -> dict[str, Any]:
    return {
        "used": _dec(used),
        "limit": None if limit is None else _dec(limit.value),
        "source": None if limit is None else limit.source,
        "utilisation": _ratio(used, limit),
    }


# --- orders --------------------------------------------------------------------------------------


def open_orders(engine: Engine, accounts: Sequence[str]) -> list[dict[str, Any]]:
    """Orders of ``accounts`` the database holds as not finished (any non-terminal status), oldest first."""
    open_statuses = [s.value for s in OrderStatus if s not in TERMINAL_STATUSES]
    c = orders.c
    query = (
        select(
            c.client_order_id,
            c.account,
            c.strategy,
            c.exchange,
            c.symbol,
            c.side,
            c.order_type,
            c.quantity,
            c.filled_quantity,
            c.price,
            c.status,
            c.exchange_order_id,
            c.emulated,
            c.created_at,
        )
        .where(c.account.in_(list(accounts)), c.status.in_(open_statuses))
        .order_by(c.account, c.created_at, c.client_order_id)
    )
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]


# --- positions, marks ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mark:
    price: Decimal
    source: str  # "candle <timeframe>" | "position snapshot"
    at: datetime


def portfolio_from_fills(engine: Engine, accounts: Sequence[str]) -> tuple[Portfolio, list[dict[str, str]]]:
    """A portfolio with every stored fill of ``accounts`` applied in time order (no balances, no marks), and
    the fills the portfolio refuses (an inverse contract), each with the reason: listed, never dropped silently."""
    portfolio = Portfolio()
    refused: list[dict[str, str]] = []
    f = fills.c
    query = select(fills).where(f.account.in_(list(accounts))).order_by(f.ts, f.exchange, f.account, f.trade_id)
    with engine.connect() as conn:
        for row in conn.execute(query).mappings():
            fill = Fill(
                fill_id=row["trade_id"],
                client_order_id=row["client_order_id"] or f"venue:{row['trade_id']}",
                exchange_order_id=row["exchange_order_id"],
                exchange=row["exchange"],
                symbol=row["symbol"],
                side=Side(row["side"]),
                price=row["price"],
                quantity=row["quantity"],
                fee=row["fee"],
                fee_currency=row["fee_currency"],
                ts=row["ts"],
            )
            try:
                portfolio.apply_fill(fill, account=row["account"], strategy=row["strategy"] or UNATTRIBUTED)
            except ValueError as exc:
                refused.append({"account": row["account"], "trade_id": row["trade_id"], "reason": str(exc)})
    return portfolio, refused


def last_candle(engine: Engine, exchange: str, symbol: str) -> dict[str, Any] | None:
    """The most recent stored bar of a market (any timeframe), with its close time."""
    c = candles.c
    query = (
        select(c.timeframe, c.ts, c.close)
        .where(c.exchange == exchange, c.symbol == symbol)
        .order_by(c.ts.desc(), c.timeframe)
        .limit(1)
    )
    with engine.connect() as conn:
        row = conn.execute(query).mappings().first()
    if row is None:
        return None
    try:
        closes_at = row["ts"] + timedelta(seconds=Timeframe.parse(row["timeframe"]).seconds)
    except ValueError:
        closes_at = row["ts"]
    return {"timeframe": row["timeframe"], "ts": row["ts"], "close": row["close"], "closes_at": closes_at}


def last_trade_ts(engine: Engine, exchange: str, symbol: str) -> datetime | None:
    t = trades.c
    with engine.connect() as conn:
        value: datetime | None = conn.execute(
            select(func.max(t.ts)).where(t.exchange == exchange, t.symbol == symbol)
        ).scalar_one_or_none()
    return value


def latest_snapshots(engine: Engine, account: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The latest account-ledger row (strategy ``''``) per (exchange, symbol) of ``account``, and the latest
    stored mark (which may be on an older row)."""
    p = position_snapshots.c
    out: dict[tuple[str, str], dict[str, Any]] = {}
    with engine.connect() as conn:
        latest = (
            select(p.exchange, p.symbol, func.max(p.ts).label("ts"))
            .where(p.account == account, p.strategy == "")
            .group_by(p.exchange, p.symbol)
            .subquery()
        )
        rows = conn.execute(
            select(position_snapshots)
            .join(
                latest,
                and_(p.exchange == latest.c.exchange, p.symbol == latest.c.symbol, p.ts == latest.c.ts),
            )
            .where(p.account == account, p.strategy == "")
        ).mappings()
        for row in rows:
            out[(row["exchange"], row["symbol"])] = {"quantity": row["quantity"], "ts": row["ts"], "mark": None}
        marked = (
            select(p.exchange, p.symbol, func.max(p.ts).label("ts"))
            .where(p.account == account, p.mark_price.is_not(None))
            .group_by(p.exchange, p.symbol)
            .subquery()
        )
        mark_rows = conn.execute(
            select(p.exchange, p.symbol, p.ts, p.mark_price)
            .join(
                marked,
                and_(p.exchange == marked.c.exchange, p.symbol == marked.c.symbol, p.ts == marked.c.ts),
            )
            .where(p.account == account, p.mark_price.is_not(None))
        ).mappings()
        for row in mark_rows:
            entry = out.setdefault((row["exchange"], row["symbol"]), {"quantity": None, "ts": None, "mark": None})
            entry["mark"] = Mark(row["mark_price"], "position snapshot", row["ts"])
    return out


def choose_mark(candle: dict[str, Any] | None, snapshot_mark: Mark | None) -> Mark | None:
    """The later of the last candle close (at its close time) and the snapshot's mark."""
    from_candle = (
        None if candle is None else Mark(candle["close"], f"candle {candle['timeframe']}", candle["closes_at"])
    )
    if from_candle is None:
        return snapshot_mark
    if snapshot_mark is None or from_candle.at >= snapshot_mark.at:
        return from_candle
    return snapshot_mark


# --- the account view -------------------------------------------------------------------------------


def _worst_case(quantity: Decimal, open_rows: Iterable[dict[str, Any]]) -> Decimal:
    """The signed position if every open order filled on the side that makes it largest (the risk engine's)."""
    buys = sells = _ZERO
    for row in open_rows:
        remaining = row["quantity"] - row["filled_quantity"]
        if row["side"] == "buy":
            buys += remaining
        else:
            sells += remaining
    up, down = quantity + buys, quantity - sells
    return up if abs(up) >= abs(down) else down


def kill_switch_view(states: dict[str, KillSwitchState]) -> dict[str, dict[str, Any]]:
    return {
        scope: {"mode": state.mode.value, "reason": state.reason, "actor": state.actor, "since": _iso(state.since)}
        for scope, state in sorted(states.items(), key=lambda item: (item[0] != "global", item[0]))
    }


def account_status(
    settings: MelticaSettings,
    engine: Engine,
    account: str,
    *,
    portfolio: Portfolio,
    switch: KillSwitch,
    refused_fills: Sequence[dict[str, str]] = (),
) -> dict[str, Any]:
    """One account's part of ``meltica live status --json`` (see the module docstring)."""
    open_rows = open_orders(engine, [account])
    snapshots = latest_snapshots(engine, account)
    markets = {(p.exchange, p.symbol) for p in portfolio.positions(account=account)}
    markets |= {(row["exchange"], row["symbol"]) for row in open_rows}
    marks: dict[tuple[str, str], Mark | None] = {}
    for exchange, symbol in sorted(markets):
        snapshot = snapshots.get((exchange, symbol))
        mark = choose_mark(last_candle(engine, exchange, symbol), None if snapshot is None else snapshot["mark"])
        marks[(exchange, symbol)] = mark
        if mark is not None and mark.price > 0:
            portfolio.mark(exchange, symbol, mark.price)
        elif mark is not None:
            marks[(exchange, symbol)] = None

    limits = resolve_limits(settings.risk, account, "", "")
    positions = []
    gross = net = _ZERO
    for exchange, symbol in sorted(markets):
        position = portfolio.position(account, exchange, symbol)
        market_orders = [r for r in open_rows if (r["exchange"], r["symbol"]) == (exchange, symbol)]
        mark = marks[(exchange, symbol)]
        price = mark.price if mark is not None else position.avg_entry_price
        if price is None:  # no mark, flat: value open orders at their own price
            priced = [r["price"] for r in market_orders if r["price"] is not None]
            price = priced[0] if priced else None
        worst = _worst_case(position.quantity, market_orders)
        worst_value = _ZERO if price is None else worst * price
        gross += abs(worst_value)
        net += worst_value
        snapshot = snapshots.get((exchange, symbol))
        position_limit = resolve_limits(settings.risk, account, "", symbol).on_account("max_position_notional")
        positions.append(
            {
                "exchange": exchange,
                "symbol": symbol,
                "quantity": _dec(position.quantity),
                "avg_entry_price": _dec(position.avg_entry_price),
                "mark_price": None if mark is None else _dec(mark.price),
                "mark_source": None if mark is None else mark.source,
                "mark_at": None if mark is None else _iso(mark.at),
                "unrealized_pnl": None if mark is None else _dec(portfolio.unrealized_pnl(account, exchange, symbol)),
                "realized_pnl": _dec(position.realized_pnl),
                "fees": _dec(position.fees),
                "open_orders": len(market_orders),
                "worst_case_quantity": _dec(worst),
                "position_limit": _limit_view(position_limit, abs(worst_value)),
                "snapshot_quantity": None if snapshot is None else _dec(snapshot["quantity"]),
                "snapshot_at": None if snapshot is None else _iso(snapshot["ts"]),
            }
        )

    strategies = []
    for strategy in portfolio.strategies(account):
        pnl = portfolio.pnl(account=account, strategy=strategy)
        strategies.append(
            {
                "strategy": strategy,
                "realized_pnl": _dec(pnl.realized),
                "unrealized_pnl": _dec(pnl.unrealized),
                "fees": _dec(pnl.fees),
                "total_pnl": _dec(pnl.total),
                "other_fees": {k: _dec(v) for k, v in pnl.other_fees.items()},
            }
        )
    total = portfolio.pnl(account=account)

    instances = [i for i in settings.live.instances if i.account == account]
    effective = {}
    for instance in instances:
        mode, scope = switch.effective(account, instance.instance_id)
        effective[instance.instance_id] = {"mode": mode.value, "scope": scope}
    relevant = {"global", f"account:{account}"} | {f"strategy:{i.instance_id}" for i in instances}
    config = next((a for a in settings.accounts if a.name == account), None)
    return {
        "account": account,
        "exchange": None if config is None else config.exchange,
        "instances": [i.instance_id for i in instances],
        "open_orders": [
            {
                "client_order_id": r["client_order_id"],
                "strategy": r["strategy"],
                "symbol": r["symbol"],
                "side": r["side"],
                "type": r["order_type"],
                "quantity": _dec(r["quantity"]),
                "filled_quantity": _dec(r["filled_quantity"]),
                "price": _dec(r["price"]),
                "status": r["status"],
                "exchange_order_id": r["exchange_order_id"],
                "created_at": _iso(r["created_at"]),
            }
            for r in open_rows
        ],
        "positions": positions,
        "pnl": {
            "realized": _dec(total.realized),
            "unrealized": _dec(total.unrealized),
            "fees": _dec(total.fees),
            "total": _dec(total.total),
        },
        "strategies": strategies,
        "unbooked_fills": [f for f in refused_fills if f["account"] == account],
        "risk": {
            "gross_exposure": _limit_view(limits.max_gross_exposure, gross),
            "net_exposure": _limit_view(limits.max_net_exposure, abs(net)),
            "open_orders": _limit_view(limits.on_account("max_open_orders"), Decimal(len(open_rows))),
            "unpriced_markets": sorted(f"{e}:{s}" for (e, s), m in marks.items() if m is None),
        },
        "kill_switch": {
            "scopes": {k: v for k, v in kill_switch_view(switch.states()).items() if k in relevant},
            "effective": effective,
        },
    }


def market_data_status(settings: MelticaSettings, engine: Engine, now: datetime) -> list[dict[str, Any]]:
    """Per market the instances trade: the latest stored candle and trade, their age, stale or not."""
    exchange_of = {a.name: a.exchange for a in settings.accounts}
    markets = sorted(
        {(exchange_of[i.account], s) for i in settings.live.instances if i.account in exchange_of for s in i.symbols}
    )
    stale_after = settings.live.ingest.stale_after_s
    out = []
    for exchange, symbol in markets:
        candle = last_candle(engine, exchange, symbol)
        trade_ts = last_trade_ts(engine, exchange, symbol)
        latest = max(
            (t for t in (None if candle is None else candle["closes_at"], trade_ts) if t is not None), default=None
        )
        age = None if latest is None else round((now - latest).total_seconds(), 1)
        out.append(
            {
                "exchange": exchange,
                "symbol": symbol,
                "last_candle_ts": None if candle is None else _iso(candle["ts"]),
                "last_candle_timeframe": None if candle is None else candle["timeframe"],
                "last_trade_ts": _iso(trade_ts),
                "age_s": age,
                "stale": age is None or age > stale_after,
            }
        )
    return out


def deployment_status(settings: MelticaSettings, engine: Engine, *, now: datetime) -> dict[str, Any]:
    """Every account of the deployment, the kill switch and the market data (database only)."""
    names = [a.name for a in settings.accounts]
    traded = sorted({i.account for i in settings.live.instances} - set(names))
    accounts = names + traded
    portfolio, refused = portfolio_from_fills(engine, accounts)
    switch = KillSwitch(KillSwitchStore(engine))
    return {
        "generated_at": _iso(now),
        "environment": settings.environment,
        "topic_prefix": settings.live.topic_prefix,
        "accounts": [
            account_status(settings, engine, account, portfolio=portfolio, switch=switch, refused_fills=refused)
            for account in accounts
        ],
        "kill_switch": kill_switch_view(switch.states()),
        "market_data": market_data_status(settings, engine, now),
    }


# --- market status from the control topic (optional) ---------------------------------------------------


def market_status_messages(
    bootstrap: str, topic: str, *, timeout_s: float = 5.0, monotonic: Callable[[], float] = time.monotonic
) -> list[dict[str, Any]]:
    """The latest market status message per market on the control topic, decoded loosely (the envelope's
    ``data`` as it is): a message whose schema is ``MarketStatus`` or whose ``command`` is ``market_status``.
    Empty when the topic does not exist or holds none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # kafka-python 3 read_text on import
        # lazy: kafka-python (about 0.4 s) only when the status reads the topics
        from kafka import KafkaConsumer, TopicPartition

    timeout_ms = int(timeout_s * 1000)
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        request_timeout_ms=timeout_ms + 5000,
        consumer_timeout_ms=timeout_ms,
    )
    latest: dict[str, dict[str, Any]] = {}
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        deadline = monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in tps) and monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                for message in records:
                    data = _market_status(message.value)
                    if data is not None:
                        key = f"{data.get('exchange')}:{data.get('symbol')}"
                        latest[key] = data
    finally:
        consumer.close()
    return [latest[key] for key in sorted(latest)]


def _market_status(raw: bytes | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        envelope = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("data"), dict):
        return None
    data: dict[str, Any] = envelope["data"]
    if envelope.get("schema") == "MarketStatus" or data.get("command") == "market_status":
        return data
    return None
