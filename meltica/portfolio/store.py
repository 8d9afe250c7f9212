"""Portfolio snapshots in ``position_snapshots`` and ``balance_snapshots``.

``save_snapshot(portfolio, ts)`` writes, in one transaction, one row per ledger (strategy ``''`` is
the account ledger) and one row per holding (``source = 'local'``: the portfolio's own view, as
opposed to a venue's report). Saving again at the same ``ts`` replaces that snapshot of those
accounts, so a retried save is idempotent.

``load_latest()`` rebuilds a ``Portfolio`` from each account's latest snapshot: ledgers, holdings and
the marks stored with the positions. The cost basis comes back exactly when the row has a mark
(``cost = quantity × mark − unrealized``), else from the stored average price (80 significant
digits). Not in the tables, so not restored: fees in other currencies (``other_fees``), fill counts,
the fill-id de-duplication set and reservations. After a restart, replay the fills after the
snapshot's ``ts`` and let the OMS reserve its open orders again.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal, localcontext
from typing import Any

from sqlalchemy import Engine, and_, delete, func, select, tuple_, union_all
from sqlalchemy.dialects.postgresql import insert

from meltica.domain.values import require_utc
from meltica.portfolio.portfolio import _EXACT, ACCOUNT_LEDGER, Holding, Portfolio
from meltica.storage.tables import balance_snapshots, position_snapshots

SOURCE = "local"


def _stored_strategy(strategy: str) -> str:
    return "" if strategy == ACCOUNT_LEDGER else strategy


def _memory_strategy(strategy: str) -> str:
    return ACCOUNT_LEDGER if strategy == "" else strategy


class PortfolioStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def save_snapshot(self, portfolio: Portfolio, ts: datetime | None = None) -> int:
        """Write the snapshot at ``ts`` (default: the portfolio's clock); returns the rows written."""
        if ts is None:
            if portfolio.clock is None:
                raise ValueError("save_snapshot needs ts when the portfolio has no clock")
            ts = portfolio.clock()
        ts = require_utc(ts)
        positions: list[dict[str, Any]] = []
        with localcontext(_EXACT):
            for (account, exchange, symbol, strategy), qty, cost, realized, fees, mark in portfolio.ledger_state():
                positions.append(
                    {
                        "account": account,
                        "exchange": exchange,
                        "symbol": symbol,
                        "strategy": _stored_strategy(strategy),
                        "ts": ts,
                        "quantity": qty,
                        "average_entry_price": None if qty == 0 else cost / qty,
                        "realized_pnl": realized,
                        "unrealized_pnl": None if mark is None else qty * mark - cost,
                        "fees": fees,
                        "mark_price": mark,
                    }
                )
        accounts = portfolio.accounts()
        balances = [
            {
                "account": account,
                "exchange": exchange,
                "asset": asset,
                "ts": ts,
                "free": holding.free,
                "locked": holding.locked,
                "total": holding.total,
                "source": SOURCE,
            }
            for account in accounts
            for (exchange, asset), holding in portfolio.holdings(account).items()
        ]
        with self._engine.begin() as conn:
            if accounts:
                conn.execute(
                    delete(position_snapshots).where(
                        position_snapshots.c.ts == ts, position_snapshots.c.account.in_(accounts)
                    )
                )
                conn.execute(
                    delete(balance_snapshots).where(
                        balance_snapshots.c.ts == ts,
                        balance_snapshots.c.source == SOURCE,
                        balance_snapshots.c.account.in_(accounts),
                    )
                )
            if positions:
                conn.execute(insert(position_snapshots), positions)
            if balances:
                conn.execute(insert(balance_snapshots), balances)
        return len(positions) + len(balances)

    def latest_ts(self, *, account: str | None = None, at: datetime | None = None) -> dict[str, datetime]:
        """``{account: ts of its latest snapshot}`` (at or before ``at``)."""
        p, b = position_snapshots.c, balance_snapshots.c
        pos = select(p.account.label("account"), p.ts.label("ts"))
        bal = select(b.account.label("account"), b.ts.label("ts")).where(b.source == SOURCE)
        if account is not None:
            pos, bal = pos.where(p.account == account), bal.where(b.account == account)
        if at is not None:
            at = require_utc(at)
            pos, bal = pos.where(p.ts <= at), bal.where(b.ts <= at)
        both = union_all(pos, bal).subquery()
        query = select(both.c.account, func.max(both.c.ts)).group_by(both.c.account)
        with self._engine.connect() as conn:
            return {row[0]: row[1] for row in conn.execute(query)}

    def load_latest(
        self,
        *,
        account: str | None = None,
        at: datetime | None = None,
        clock: Callable[[], datetime] | None = None,
        valuation_currency: str | None = None,
    ) -> Portfolio:
        """A ``Portfolio`` rebuilt from each account's latest snapshot (empty if there is none)."""
        portfolio = Portfolio(clock=clock, valuation_currency=valuation_currency)
        latest = self.latest_ts(account=account, at=at)
        if not latest:
            return portfolio
        keys = list(latest.items())
        p, b = position_snapshots.c, balance_snapshots.c
        with self._engine.connect() as conn:
            pos_rows = conn.execute(
                select(position_snapshots)
                .where(tuple_(p.account, p.ts).in_(keys))
                .order_by(p.account, p.exchange, p.symbol, p.strategy)
            ).all()
            bal_rows = conn.execute(
                select(balance_snapshots)
                .where(and_(tuple_(b.account, b.ts).in_(keys), b.source == SOURCE))
                .order_by(b.account, b.exchange, b.asset)
            ).all()
        mark_ts: dict[tuple[str, str], datetime] = {}
        with localcontext(_EXACT):
            for row in pos_rows:
                qty: Decimal = row.quantity
                if qty == 0:
                    cost = Decimal(0)
                elif row.mark_price is not None and row.unrealized_pnl is not None:
                    cost = qty * row.mark_price - row.unrealized_pnl
                else:
                    cost = qty * row.average_entry_price
                portfolio.restore_ledger(
                    row.account,
                    row.exchange,
                    row.symbol,
                    _memory_strategy(row.strategy),
                    quantity=qty,
                    cost=cost,
                    realized=row.realized_pnl,
                    fees=row.fees,
                )
                market = (row.exchange, row.symbol)
                if row.mark_price is not None and (market not in mark_ts or row.ts > mark_ts[market]):
                    mark_ts[market] = row.ts
                    portfolio.restore_mark(row.exchange, row.symbol, row.mark_price)
        for row in bal_rows:
            portfolio.restore_holding(row.account, row.exchange, Holding(row.asset, row.free, row.locked))
        return portfolio
