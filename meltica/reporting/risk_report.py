"""The daily risk report of one UTC day, computed from the stored facts.

Method
    * **PnL** — every stored fill up to the day's end is replayed, in time order, into a
      ``meltica.portfolio.Portfolio`` (average cost; fills without a strategy go to ``unattributed``).
      For each (account, strategy, symbol) sub-ledger, and for each account ledger (the venue's view):
      ``realized`` and ``fees`` are what the day added (value at the end − value at the start),
      ``unrealized`` is the open position at the day-end mark, ``unrealized_change`` its change over the
      day, and ``pnl = realized + unrealized_change − fees``. Tables by strategy and by symbol sum the
      sub-ledgers; by account uses the account ledgers.
    * **Marks** at an instant ``t``: ``marks`` given by the caller (day end only; keyed by symbol or
      ``(exchange, symbol)``), else the close of the last stored candle opened before ``t`` (any
      timeframe), else the last ``position_snapshots.mark_price`` at or before ``t``, else the last fill
      price before ``t``.
    * **Exposure** — ``Portfolio.exposure`` at the day-end marks (gross, net, per symbol), per account
      and per strategy.
    * **Drawdown** — of the day's PnL curve per account and for the whole book: 0 at the start, a point
      after every fill (that market marked at the fill price), the last point at the day-end marks;
      ``max(peak − value)``.
    * **VaR / ES** — historical simulation of the *day-end positions* of each account (and the book):
      scenario ``i`` is ``Σ_markets quantity × mark × r_i`` with ``r_i`` the simple return of the market
      between consecutive closes of its stored candles at ``var_timeframe`` (default 1h, so a one-hour
      horizon) over the ``var_lookback`` (default 30 days) before the day's end, on the timestamps every
      held market has. ``VaR_a = −quantile(pnl, 1 − a)`` (numpy's linear interpolation) and
      ``ES_a = −mean(pnl[pnl ≤ quantile(pnl, 1 − a)])``, for a = 95 % and 99 %.
    * **Limits** — with a ``RiskConfig``: per account gross and net exposure and the day's loss; per
      strategy its day's loss (``strategy_loss_limit``); per position its notional against
      ``max_position_notional`` (resolved per route, ``meltica.risk.limits``). ``utilisation = value /
      limit``; above 1 is a breach.
    * **Risk events** of the day (``risk_events``): counts by decision, the breaches, rejections by rule
      and every kill-switch change; **reconciliation** runs started that day with their discrepancies.
    * **Snapshots** — the latest ``balance_snapshots`` per asset and a check of the latest account-level
      ``position_snapshots`` quantity against the replay (mismatches listed).

Storage: ``store_report`` upserts the report's JSON into ``risk_state`` under ``risk_report:<day>``
(there is no report table; the JSON is small and keyed by day), and the flow writes ``risk-report-<day>
.md`` / ``.json`` / ``.png`` under an output directory and links them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Engine, and_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from meltica.domain.orders import Fill
from meltica.errors import DataValidationError
from meltica.portfolio import Portfolio
from meltica.risk.limits import RiskConfig, resolve_limits
from meltica.storage.candles import read_candles
from meltica.storage.tables import (
    balance_snapshots,
    candles,
    fills,
    position_snapshots,
    reconciliation_discrepancies,
    reconciliation_runs,
    risk_events,
    risk_state,
)

UNATTRIBUTED = "unattributed"
CONFIDENCES = (0.95, 0.99)
_ZERO = Decimal(0)
Market = tuple[str, str]  # exchange, symbol
MarksInput = Mapping[str, Any] | Mapping[tuple[str, str], Any]


# --- result types ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PnLLine:
    """One (account, strategy, symbol) — or an aggregate where a key is ``"*"``. Amounts in the quote."""

    account: str
    strategy: str
    symbol: str
    realized: Decimal = _ZERO
    unrealized: Decimal = _ZERO
    unrealized_change: Decimal = _ZERO
    fees: Decimal = _ZERO
    quantity: Decimal = _ZERO
    mark: Decimal | None = None

    @property
    def pnl(self) -> Decimal:
        return self.realized + self.unrealized_change - self.fees


@dataclass(frozen=True)
class ExposureLine:
    account: str
    strategy: str  # "*" = the account
    gross: Decimal
    net: Decimal
    per_symbol: Mapping[str, Decimal]


@dataclass(frozen=True)
class LimitUse:
    scope: str  # "account:a", "strategy:a/s", "position:a/s/sym"
    limit: str  # e.g. max_gross_exposure
    source: str  # the config path
    value: Decimal
    limit_value: Decimal

    @property
    def utilisation(self) -> float:
        return float(self.value / self.limit_value) if self.limit_value else float("inf")

    @property
    def breached(self) -> bool:
        return self.value > self.limit_value


@dataclass(frozen=True)
class VaRLine:
    scope: str  # account name or "*"
    observations: int
    var: Mapping[str, float]  # "95" -> VaR
    es: Mapping[str, float]
    note: str | None = None


@dataclass(frozen=True)
class RiskReport:
    day: date
    start: datetime
    end: datetime
    pnl: Sequence[PnLLine]  # sub-ledgers
    by_account: Sequence[PnLLine]
    by_strategy: Sequence[PnLLine]
    by_symbol: Sequence[PnLLine]
    exposure: Sequence[ExposureLine]
    limits: Sequence[LimitUse]
    drawdown: Mapping[str, Decimal]  # account or "*" -> max drawdown of the day's PnL curve
    curve: Mapping[str, Sequence[tuple[datetime, Decimal]]]
    var: Sequence[VaRLine]
    var_method: str
    scenarios: Mapping[str, Sequence[float]]  # scope -> scenario PnL series used for VaR/ES
    marks: Mapping[str, Decimal]  # "exchange:symbol" -> day-end mark
    risk_events: Mapping[str, int]  # decision -> count
    breaches: Sequence[Mapping[str, Any]]
    rejections_by_rule: Mapping[str, int]
    kill_switch: Sequence[Mapping[str, Any]]
    reconciliation: Sequence[Mapping[str, Any]]
    discrepancies_by_kind: Mapping[str, int]
    balances: Sequence[Mapping[str, Any]]
    snapshot_mismatches: Sequence[Mapping[str, Any]]
    fills: int = 0
    notes: Sequence[str] = field(default_factory=tuple)

    @property
    def breached_limits(self) -> list[LimitUse]:
        return [u for u in self.limits if u.breached]

    def to_json(self) -> dict[str, Any]:
        def conv(value: Any) -> Any:
            if isinstance(value, Decimal):
                return str(value)
            if isinstance(value, datetime | date):
                return value.isoformat()
            if isinstance(value, Mapping):
                return {str(k): conv(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [conv(v) for v in value]
            if isinstance(value, float) and not np.isfinite(value):
                return str(value)
            return value

        doc: dict[str, Any] = conv(asdict(self))
        for key, lines in (
            ("pnl", self.pnl),
            ("by_account", self.by_account),
            ("by_strategy", self.by_strategy),
            ("by_symbol", self.by_symbol),
        ):
            for out, line in zip(doc[key], lines, strict=True):
                out["pnl"] = str(line.pnl)
        for out, use in zip(doc["limits"], self.limits, strict=True):
            out["utilisation"] = conv(use.utilisation)
            out["breached"] = use.breached
        return doc


# --- VaR -------------------------------------------------------------------------------------


def historical_var_es(pnl: Sequence[float] | npt.NDArray[np.float64], confidence: float) -> tuple[float, float]:
    """Historical VaR and expected shortfall of a PnL sample, both as positive losses (module docstring)."""
    sample = np.asarray(pnl, dtype=np.float64)
    if sample.size == 0:
        raise DataValidationError("VaR of an empty sample", reason="no_data")
    q = float(np.quantile(sample, 1.0 - confidence))
    tail = sample[sample <= q]
    return -q, -float(tail.mean())


# --- the build -------------------------------------------------------------------------------


def _day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time(0), tzinfo=UTC)
    return start, start + timedelta(days=1)


def _fill(row: Mapping[str, Any]) -> Fill:
    return Fill(
        fill_id=row["trade_id"],
        client_order_id=row["client_order_id"] or row["trade_id"],
        exchange_order_id=row["exchange_order_id"],
        exchange=row["exchange"],
        symbol=row["symbol"],
        side=row["side"],
        price=row["price"],
        quantity=row["quantity"],
        fee=row["fee"],
        fee_currency=row["fee_currency"],
        liquidity=row["liquidity"],
        ts=row["ts"],
    )


class _Marks:
    def __init__(self, engine: Engine, fill_rows: Sequence[Mapping[str, Any]]) -> None:
        self.engine = engine
        self.fill_rows = fill_rows

    def at(self, market: Market, t: datetime) -> Decimal | None:
        exchange, symbol = market
        with self.engine.connect() as conn:
            price = conn.execute(
                select(candles.c.close)
                .where(candles.c.exchange == exchange, candles.c.symbol == symbol, candles.c.ts < t)
                .order_by(candles.c.ts.desc())
                .limit(1)
            ).scalar()
            if price is None:
                price = conn.execute(
                    select(position_snapshots.c.mark_price)
                    .where(
                        position_snapshots.c.exchange == exchange,
                        position_snapshots.c.symbol == symbol,
                        position_snapshots.c.ts <= t,
                        position_snapshots.c.mark_price.is_not(None),
                    )
                    .order_by(position_snapshots.c.ts.desc())
                    .limit(1)
                ).scalar()
        if price is None:
            for row in reversed(self.fill_rows):
                if row["ts"] < t and (row["exchange"], row["symbol"]) == market:
                    price = row["price"]
                    break
        return Decimal(price) if price is not None else None


def _given_marks(marks: MarksInput | None) -> dict[Any, Decimal]:
    return {k: Decimal(str(v)) for k, v in (marks or {}).items()}


def _lines(
    pf: Portfolio, keys: Iterable[tuple[str, str, str]], start_vals: Mapping[tuple[str, str, str], Any]
) -> list[PnLLine]:
    out: list[PnLLine] = []
    for account, strategy, symbol in sorted(keys):
        ledger_strategy = None if strategy == "*" else strategy
        end = pf.pnl(account=account, strategy=ledger_strategy, symbol=symbol)
        begin = start_vals.get((account, strategy, symbol))
        quantity = sum(
            (p.quantity for p in pf.positions(account=account, strategy=ledger_strategy) if p.symbol == symbol),
            _ZERO,
        )
        mark = next((m for (ex, sym), m in pf.marks.items() if sym == symbol), None)
        out.append(
            PnLLine(
                account=account,
                strategy=strategy,
                symbol=symbol,
                realized=end.realized - (begin.realized if begin else _ZERO),
                unrealized=end.unrealized,
                unrealized_change=end.unrealized - (begin.unrealized if begin else _ZERO),
                fees=end.fees - (begin.fees if begin else _ZERO),
                quantity=quantity,
                mark=mark,
            )
        )
    return out


def _sum_lines(lines: Iterable[PnLLine], key: str) -> list[PnLLine]:
    acc: dict[str, list[PnLLine]] = {}
    for line in lines:
        acc.setdefault(getattr(line, key), []).append(line)
    out = []
    for name, group in sorted(acc.items()):
        out.append(
            PnLLine(
                account=name if key == "account" else "*",
                strategy=name if key == "strategy" else "*",
                symbol=name if key == "symbol" else "*",
                realized=sum((g.realized for g in group), _ZERO),
                unrealized=sum((g.unrealized for g in group), _ZERO),
                unrealized_change=sum((g.unrealized_change for g in group), _ZERO),
                fees=sum((g.fees for g in group), _ZERO),
                quantity=sum((g.quantity for g in group), _ZERO) if key == "symbol" else _ZERO,
            )
        )
    return out


def _total(pf: Portfolio, account: str | None) -> Decimal:
    return pf.pnl(account=account).total


def build_risk_report(
    engine: Engine,
    day: date,
    *,
    limits: RiskConfig | None = None,
    marks: MarksInput | None = None,
    var_timeframe: str = "1h",
    var_lookback: timedelta = timedelta(days=30),
) -> RiskReport:
    """The risk report of the UTC ``day`` (module docstring for every method)."""
    start, end = _day_bounds(day)
    notes: list[str] = []
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(select(fills).where(fills.c.ts < end).order_by(fills.c.ts)).mappings()]
    mark_source = _Marks(engine, rows)
    given = _given_marks(marks)
    pf = Portfolio()
    before = [r for r in rows if r["ts"] < start]
    during = [r for r in rows if r["ts"] >= start]
    for r in before:
        pf.apply_fill(_fill(r), account=r["account"], strategy=r["strategy"] or UNATTRIBUTED)
    markets: set[Market] = {(r["exchange"], r["symbol"]) for r in rows}
    for m in sorted({(r["exchange"], r["symbol"]) for r in before}):
        price = mark_source.at(m, start)
        if price is not None:
            pf.mark(*m, price)
    sub_keys = {(r["account"], r["strategy"] or UNATTRIBUTED, r["symbol"]) for r in rows}
    acct_keys = {(a, "*", s) for a, _, s in sub_keys}
    accounts = sorted({k[0] for k in sub_keys})
    start_vals = {
        k: pf.pnl(account=k[0], strategy=None if k[1] == "*" else k[1], symbol=k[2]) for k in sub_keys | acct_keys
    }
    start_totals = {a: _total(pf, a) for a in accounts}
    start_book = _total(pf, None)
    curve: dict[str, list[tuple[datetime, Decimal]]] = {a: [(start, _ZERO)] for a in [*accounts, "*"]}
    for r in during:
        pf.apply_fill(_fill(r), account=r["account"], strategy=r["strategy"] or UNATTRIBUTED)
        pf.mark(r["exchange"], r["symbol"], r["price"])
        curve[r["account"]].append((r["ts"], _total(pf, r["account"]) - start_totals[r["account"]]))
        curve["*"].append((r["ts"], _total(pf, None) - start_book))
    end_marks: dict[str, Decimal] = {}
    for m in sorted(markets):
        price = given.get(m, given.get(m[1]))
        if price is None:
            price = mark_source.at(m, end)
        if price is None:
            notes.append(f"no mark for {m[0]} {m[1]}: valued at its entry price")
            continue
        pf.mark(*m, price)
        end_marks[f"{m[0]}:{m[1]}"] = price
    for a in accounts:
        curve[a].append((end, _total(pf, a) - start_totals[a]))
    curve["*"].append((end, _total(pf, None) - start_book))
    drawdown = {k: _max_drawdown([v for _, v in pts]) for k, pts in curve.items()}

    pnl_lines = _lines(pf, sub_keys, start_vals)
    by_account = _sum_lines(_lines(pf, acct_keys, start_vals), "account")
    by_strategy = _sum_lines(pnl_lines, "strategy")
    by_symbol = _sum_lines(pnl_lines, "symbol")

    exposure: list[ExposureLine] = []
    for a in accounts:
        e = pf.exposure(account=a)
        exposure.append(ExposureLine(a, "*", e.gross, e.net, dict(e.per_symbol)))
        for s in pf.strategies(a):
            e = pf.exposure(account=a, strategy=s)
            exposure.append(ExposureLine(a, s, e.gross, e.net, dict(e.per_symbol)))

    limit_uses = _limit_uses(limits, pf, exposure, by_account, pnl_lines, accounts) if limits is not None else []
    var_lines, scenarios = _var(engine, pf, accounts, end, var_timeframe, var_lookback)
    events = _events(engine, start, end)
    recon, by_kind = _reconciliation(engine, start, end)
    balances, mismatches = _snapshots(engine, pf, end)
    return RiskReport(
        day=day,
        start=start,
        end=end,
        pnl=pnl_lines,
        by_account=by_account,
        by_strategy=by_strategy,
        by_symbol=by_symbol,
        exposure=exposure,
        limits=limit_uses,
        drawdown=drawdown,
        curve=curve,
        var=var_lines,
        var_method=(
            f"historical simulation of the day-end positions over {var_timeframe} returns of stored candles, "
            f"{var_lookback.days} days before the day's end; VaR = -quantile(pnl, 1-a), ES = -mean(pnl <= quantile)"
        ),
        scenarios=scenarios,
        marks=end_marks,
        risk_events=events["counts"],
        breaches=events["breaches"],
        rejections_by_rule=events["rejections"],
        kill_switch=events["kill_switch"],
        reconciliation=recon,
        discrepancies_by_kind=by_kind,
        balances=balances,
        snapshot_mismatches=mismatches,
        fills=len(during),
        notes=tuple(notes),
    )


def _max_drawdown(values: Sequence[Decimal]) -> Decimal:
    peak = values[0] if values else _ZERO
    worst = _ZERO
    for v in values:
        peak = max(peak, v)
        worst = max(worst, peak - v)
    return worst


def _limit_uses(
    limits: RiskConfig,
    pf: Portfolio,
    exposure: Sequence[ExposureLine],
    by_account: Sequence[PnLLine],
    pnl_lines: Sequence[PnLLine],
    accounts: Sequence[str],
) -> list[LimitUse]:
    uses: list[LimitUse] = []
    account_exposure = {e.account: e for e in exposure if e.strategy == "*"}
    account_pnl = {line.account: line.pnl for line in by_account}
    for a in accounts:
        resolved = resolve_limits(limits, a, "", "")
        e = account_exposure[a]
        for name, value in (
            ("max_gross_exposure", e.gross),
            ("max_net_exposure", abs(e.net)),
            ("daily_loss_limit", max(_ZERO, -account_pnl.get(a, _ZERO))),
        ):
            lim = getattr(resolved, name)
            if lim is not None:
                uses.append(LimitUse(f"account:{a}", name, lim.source, value, lim.value))
    strategy_pnl: dict[tuple[str, str], Decimal] = {}
    for line in pnl_lines:
        strategy_pnl[(line.account, line.strategy)] = strategy_pnl.get((line.account, line.strategy), _ZERO) + line.pnl
    for (a, s), value in sorted(strategy_pnl.items()):
        lim = resolve_limits(limits, a, s, "").strategy_loss_limit
        if lim is not None:
            uses.append(LimitUse(f"strategy:{a}/{s}", "strategy_loss_limit", lim.source, max(_ZERO, -value), lim.value))
    for line in pnl_lines:
        if line.quantity == 0:
            continue
        # every level's position limit: the account's (or symbol's) on the account, a strategy's on it
        for lim in resolve_limits(limits, line.account, line.strategy, line.symbol).max_position_notional:
            if lim.scope == "strategy":
                per_market = pf.exposure(account=line.account, strategy=line.strategy).per_market
                value = abs(sum((v for (_ex, sym), v in per_market.items() if sym == line.symbol), _ZERO))
            else:
                value = abs(account_exposure[line.account].per_symbol.get(line.symbol, _ZERO))
            uses.append(
                LimitUse(
                    f"position:{line.account}/{line.strategy}/{line.symbol}",
                    "max_position_notional",
                    lim.source,
                    value,
                    lim.value,
                )
            )
    return uses


def _var(
    engine: Engine, pf: Portfolio, accounts: Sequence[str], end: datetime, timeframe: str, lookback: timedelta
) -> tuple[list[VaRLine], dict[str, list[float]]]:
    closes: dict[Market, dict[datetime, float]] = {}

    def series(market: Market) -> dict[datetime, float] | None:
        if market not in closes:
            try:
                got = read_candles(
                    engine, exchange=market[0], symbol=market[1], timeframe=timeframe, start=end - lookback, end=end
                )
            except DataValidationError:
                got = []
            closes[market] = {c.ts: float(c.close) for c in got}
        return closes[market] or None

    lines: list[VaRLine] = []
    scenarios: dict[str, list[float]] = {}
    for scope in [*accounts, "*"]:
        held = {
            (p.exchange, p.symbol): p.quantity
            for p in pf.positions(account=None if scope == "*" else scope, include_flat=False)
        }
        if scope == "*":
            held = {}
            for p in pf.positions(include_flat=False):
                held[(p.exchange, p.symbol)] = held.get((p.exchange, p.symbol), _ZERO) + p.quantity
        if not held:
            lines.append(VaRLine(scope, 0, {}, {}, "no open positions"))
            continue
        data = {m: series(m) for m in held}
        missing = [f"{m[0]}:{m[1]}" for m, s in data.items() if s is None]
        if missing:
            lines.append(VaRLine(scope, 0, {}, {}, f"no stored {timeframe} candles for {', '.join(missing)}"))
            continue
        common = sorted(set.intersection(*(set(s) for s in data.values() if s is not None)))
        if len(common) < 3:
            lines.append(VaRLine(scope, 0, {}, {}, "fewer than 3 common candles"))
            continue
        pnl = np.zeros(len(common) - 1)
        for m, qty in held.items():
            s = data[m]
            assert s is not None
            px = np.array([s[t] for t in common])
            mark = pf.mark_price(*m)
            value = float(qty * mark) if mark is not None else float(qty) * px[-1]
            pnl += value * (px[1:] / px[:-1] - 1.0)
        scenarios[scope] = pnl.tolist()
        var: dict[str, float] = {}
        es: dict[str, float] = {}
        for c in CONFIDENCES:
            v, e = historical_var_es(pnl, c)
            var[f"{round(c * 100)}"] = v
            es[f"{round(c * 100)}"] = e
        lines.append(VaRLine(scope, len(pnl), var, es))
    return lines, scenarios


def _events(engine: Engine, start: datetime, end: datetime) -> dict[str, Any]:
    with engine.connect() as conn:
        rows = (
            conn.execute(
                select(risk_events).where(risk_events.c.ts >= start, risk_events.c.ts < end).order_by(risk_events.c.ts)
            )
            .mappings()
            .all()
        )
    counts = Counter(r["decision"] for r in rows)
    keep = ("ts", "account", "strategy", "symbol", "decision", "rule", "reason", "actor")
    breaches = [{k: r[k] for k in keep} for r in rows if r["decision"] == "breach"]
    rejections = Counter(r["rule"] or "(none)" for r in rows if r["decision"] == "rejected")
    kill = [
        {
            **{k: r[k] for k in keep},
            "scope": (r["details"] or {}).get("scope"),
            "mode": (r["details"] or {}).get("mode"),
        }
        for r in rows
        if r["decision"].startswith("kill_switch")
    ]
    return {
        "counts": dict(sorted(counts.items())),
        "breaches": breaches,
        "rejections": dict(sorted(rejections.items())),
        "kill_switch": kill,
    }


def _reconciliation(engine: Engine, start: datetime, end: datetime) -> tuple[list[dict[str, Any]], dict[str, int]]:
    with engine.connect() as conn:
        runs = (
            conn.execute(
                select(reconciliation_runs)
                .where(reconciliation_runs.c.started_at >= start, reconciliation_runs.c.started_at < end)
                .order_by(reconciliation_runs.c.started_at)
            )
            .mappings()
            .all()
        )
        ids = [r["run_id"] for r in runs]
        disc = (
            conn.execute(
                select(reconciliation_discrepancies.c.run_id, reconciliation_discrepancies.c.kind).where(
                    reconciliation_discrepancies.c.run_id.in_(ids)
                )
            ).all()
            if ids
            else []
        )
    per_run = Counter(d[0] for d in disc)
    by_kind = Counter(d[1] for d in disc)
    out = [
        {
            "run_id": str(r["run_id"]),
            "account": r["account"],
            "exchange": r["exchange"],
            "trigger": r["trigger"],
            "status": r["status"],
            "started_at": r["started_at"],
            "discrepancies": per_run.get(r["run_id"], 0),
        }
        for r in runs
    ]
    return out, dict(sorted(by_kind.items()))


def _snapshots(engine: Engine, pf: Portfolio, end: datetime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    b = balance_snapshots
    p = position_snapshots
    with engine.connect() as conn:
        bal = (
            conn.execute(
                select(b.c.account, b.c.exchange, b.c.asset, b.c.ts, b.c.free, b.c.locked, b.c.total, b.c.source)
                .distinct(b.c.account, b.c.exchange, b.c.asset)
                .where(b.c.ts < end)
                .order_by(b.c.account, b.c.exchange, b.c.asset, b.c.ts.desc())
            )
            .mappings()
            .all()
        )
        pos = (
            conn.execute(
                select(p.c.account, p.c.exchange, p.c.symbol, p.c.ts, p.c.quantity)
                .distinct(p.c.account, p.c.exchange, p.c.symbol)
                .where(and_(p.c.ts < end, p.c.strategy == ""))
                .order_by(p.c.account, p.c.exchange, p.c.symbol, p.c.ts.desc())
            )
            .mappings()
            .all()
        )
    mismatches = []
    for r in pos:
        replayed = pf.position(r["account"], r["exchange"], r["symbol"]).quantity
        if replayed != r["quantity"]:
            mismatches.append({**dict(r), "replayed": replayed})
    return [dict(r) for r in bal], mismatches


# --- storage ---------------------------------------------------------------------------------


def report_key(day: date) -> str:
    return f"risk_report:{day.isoformat()}"


def store_report(engine: Engine, report: RiskReport) -> str:
    """Upsert the report's JSON into ``risk_state`` under ``risk_report:<day>``; returns the key."""
    key = report_key(report.day)
    doc = report.to_json()
    doc.pop("curve", None)  # large and derivable; the PNG shows it
    doc.pop("scenarios", None)
    stmt = pg_insert(risk_state).values(key=key, value=doc)
    stmt = stmt.on_conflict_do_update(
        index_elements=[risk_state.c.key], set_={"value": doc, "updated_at": stmt.excluded.updated_at}
    )
    with engine.begin() as conn:
        conn.execute(stmt)
    return key


def load_stored_report(engine: Engine, day: date) -> dict[str, Any] | None:
    with engine.connect() as conn:
        value = conn.execute(select(risk_state.c.value).where(risk_state.c.key == report_key(day))).scalar()
    return dict(value) if value is not None else None


# --- markdown and PNG ------------------------------------------------------------------------


def _m(value: Decimal | None) -> str:
    return "—" if value is None else f"{value:,.2f}"


def _pnl_table(title: str, lines: Sequence[PnLLine], cols: Sequence[str]) -> str:
    head = "| " + " | ".join(cols) + " | realized | unrealized | Δ unrealized | fees | PnL |\n"
    head += "|---" * (len(cols) + 5) + "|\n"
    body = "".join(
        "| "
        + " | ".join(str(getattr(line, c)) for c in cols)
        + f" | {_m(line.realized)} | {_m(line.unrealized)} | {_m(line.unrealized_change)}"
        + f" | {_m(line.fees)} | {_m(line.pnl)} |\n"
        for line in lines
    )
    return f"#### {title}\n\n" + (head + body if lines else "_none_\n") + "\n"


def markdown(report: RiskReport, *, chart_url: str | None = None, limits_source: str | None = None) -> str:
    """The report as markdown (a Prefect artifact, ``risk-report-<day>.md``); ``limits_source`` says where
    the limits came from."""
    out = [f"### Daily risk report {report.day.isoformat()} (UTC)\n\n{report.fills} fills on the day.\n\n"]
    if chart_url:
        out.append(f"[chart]({chart_url})\n\n")
    out.append(_pnl_table("PnL by account", report.by_account, ["account"]))
    out.append(_pnl_table("PnL by strategy", report.by_strategy, ["strategy"]))
    out.append(_pnl_table("PnL by symbol", report.by_symbol, ["symbol"]))
    out.append(_pnl_table("PnL by account, strategy and symbol", report.pnl, ["account", "strategy", "symbol"]))
    out.append("#### Exposure (day-end marks)\n\n| account | strategy | gross | net |\n|---|---|---|---|\n")
    out.extend(f"| {e.account} | {e.strategy} | {_m(e.gross)} | {_m(e.net)} |\n" for e in report.exposure)
    out.append("\n#### Limit utilisation\n\n")
    if limits_source:
        out.append(f"Limits: {limits_source}.\n\n")
    if report.limits:
        out.append("| scope | limit | value | limit value | utilisation | breached |\n|---|---|---|---|---|---|\n")
        out.extend(
            f"| {u.scope} | {u.limit} | {_m(u.value)} | {_m(u.limit_value)} | {u.utilisation:.1%} | "
            f"{'**yes**' if u.breached else 'no'} |\n"
            for u in report.limits
        )
    elif limits_source:
        out.append("_no configured limit applies to the day's accounts and positions_\n")
    else:
        out.append("_no limits given_\n")
    out.append("\n#### Drawdown of the day's PnL\n\n| scope | max drawdown |\n|---|---|\n")
    out.extend(f"| {k} | {_m(v)} |\n" for k, v in report.drawdown.items())
    out.append(f"\n#### VaR / expected shortfall\n\n{report.var_method}.\n\n")
    out.append("| scope | obs | VaR 95 | ES 95 | VaR 99 | ES 99 | note |\n|---|---|---|---|---|---|---|\n")
    for v in report.var:
        cells = [f"{v.var[c]:,.2f} | {v.es[c]:,.2f}" if c in v.var else "— | —" for c in ("95", "99")]
        out.append(f"| {v.scope} | {v.observations} | {cells[0]} | {cells[1]} | {v.note or ''} |\n")
    out.append("\n#### Risk events\n\n")
    out.append(", ".join(f"{k}: {n}" for k, n in report.risk_events.items()) or "_none_")
    out.append("\n\n")
    for b in report.breaches:
        out.append(f"- breach {b['ts'].isoformat()} {b['account']} {b['strategy'] or ''} {b['rule']}: {b['reason']}\n")
    for k in report.kill_switch:
        out.append(f"- kill switch {k['ts'].isoformat()} {k['scope']} → {k['mode']} ({k['actor']}): {k['reason']}\n")
    if report.rejections_by_rule:
        out.append(
            "- rejections by rule: " + ", ".join(f"{r}: {n}" for r, n in report.rejections_by_rule.items()) + "\n"
        )
    out.append("\n#### Reconciliation\n\n")
    if report.reconciliation:
        out.append("| account | exchange | trigger | status | discrepancies |\n|---|---|---|---|---|\n")
        out.extend(
            f"| {r['account']} | {r['exchange']} | {r['trigger']} | {r['status']} | {r['discrepancies']} |\n"
            for r in report.reconciliation
        )
        if report.discrepancies_by_kind:
            out.append("\nby kind: " + ", ".join(f"{k}: {n}" for k, n in report.discrepancies_by_kind.items()) + "\n")
    else:
        out.append("_no reconciliation run on the day_\n")
    if report.snapshot_mismatches:
        out.append("\n#### Position snapshots differing from the fills\n\n")
        out.extend(
            f"- {m['account']} {m['exchange']} {m['symbol']}: snapshot {m['quantity']} vs fills {m['replayed']}\n"
            for m in report.snapshot_mismatches
        )
    if report.notes:
        out.append("\n" + "".join(f"- {n}\n" for n in report.notes))
    return "".join(out)


def render_png(report: RiskReport, path: str | Path) -> Path:
    """Three panels: the day's PnL curve per scope, PnL by strategy (realized / Δ unrealized / fees), and
    the VaR scenario histogram of the book with VaR 95/99 marked. Object API on an Agg canvas."""
    # lazy: matplotlib takes about a second to import; only the charts need it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 10))
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(3, 1)
    for scope, pts in report.curve.items():
        if len(pts) > 1:
            ax1.step([t for t, _ in pts], [float(v) for _, v in pts], where="post", label=scope)
    ax1.set_title(f"PnL during {report.day.isoformat()} (UTC)")
    ax1.legend(loc="best", fontsize="small")
    names = [line.strategy for line in report.by_strategy]
    x = np.arange(len(names))
    ax2.bar(x - 0.25, [float(line.realized) for line in report.by_strategy], 0.25, label="realized")
    ax2.bar(x, [float(line.unrealized_change) for line in report.by_strategy], 0.25, label="Δ unrealized")
    ax2.bar(x + 0.25, [-float(line.fees) for line in report.by_strategy], 0.25, label="fees")
    ax2.set_xticks(x, names)
    ax2.set_title("PnL by strategy")
    ax2.legend(loc="best", fontsize="small")
    book = report.scenarios.get("*")
    if book:
        ax3.hist(book, bins=min(50, max(5, len(book) // 5)))
        for v in report.var:
            if v.scope == "*":
                for c, style in (("95", "--"), ("99", ":")):
                    if c in v.var:
                        ax3.axvline(-v.var[c], color="red", linestyle=style, label=f"VaR {c}")
        ax3.legend(loc="best", fontsize="small")
        ax3.set_title("Scenario PnL of the day-end book (historical simulation)")
    else:
        ax3.text(0.5, 0.5, "no VaR scenarios", ha="center", va="center", transform=ax3.transAxes)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def _json_dump(report: RiskReport) -> str:
    return json.dumps(report.to_json(), indent=2)
