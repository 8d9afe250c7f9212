"""Limits resolved for one (account, strategy, symbol): the configuration's levels applied once.

Every level's limit holds on what it measures, so a more specific level can only tighten, never loosen:

* the **account** level — ``risk.accounts.<a>``, or for a field the account does not set the ``risk``
  default — is checked on the whole account: its position in the symbol (per venue), all its open orders,
  all its approvals in the last minute;
* a **strategy** level (``risk.strategies.<s>``) is checked in addition, on that strategy's own orders and
  positions in the account;
* a **symbol** level (``risk.symbols.<sym>``; ``max_position_notional_by_symbol`` is its older spelling) is
  checked in addition, on the account's orders in that symbol (a position is per symbol already: its
  position limit is measured on the account's position, like the account's);
* per-order limits (``max_order_quantity``, ``max_order_notional``, ``price_band_bps``) and a strategy's
  daily loss (``strategy_loss_limit``): the tightest of the levels that set one.

The account-wide limits (gross and net exposure, daily loss, drawdown) and the breach action are set on
the account level only. Where two levels measure the same quantity (per-order limits; an account's and
a symbol's position limit) only the tightest is kept, the more specific one on a tie. Each resolved
value remembers where it came from (``source``: the YAML path) so a rejection names the limit that
bound, and the scope it is measured on.

Resolution happens once per route and is cached by the engine: no pydantic work per check.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from meltica.config.settings import AccountRiskLimits, RiskLimits, StrategyRiskLimits, SymbolRiskLimits

RiskConfig = RiskLimits  # the name the execution contract uses (meltica/execution/README.md)

Scope = Literal["account", "strategy", "symbol"]
BreachMode = Literal["halt", "reduce_only"]
MeasuredRule = Literal["max_position_notional", "max_open_orders", "orders_per_minute"]


@dataclass(frozen=True, slots=True)
class Limit:
    """One resolved limit: its value, the configuration path it came from, what it is measured on."""

    value: Decimal
    source: str  # e.g. "risk.symbols.BTC/USDT.max_order_quantity"
    scope: Scope = "account"

    def __str__(self) -> str:
        return f"{self.value} ({self.source})"


@dataclass(frozen=True, slots=True)
class ResolvedLimits:
    """Every limit that applies to one (account, strategy, symbol). A per-order or account-wide limit is
    one ``Limit`` (``None``: no limit); a measured limit is every level's, each on its own ``scope``, in
    the order they are checked (account, strategy, symbol; empty: no limit)."""

    max_order_quantity: Limit | None
    max_order_notional: Limit | None
    price_band_bps: Limit | None
    max_position_notional: tuple[Limit, ...]
    max_open_orders: tuple[Limit, ...]
    orders_per_minute: tuple[Limit, ...]
    max_gross_exposure: Limit | None
    max_net_exposure: Limit | None
    daily_loss_limit: Limit | None
    max_drawdown_pct: Limit | None
    strategy_loss_limit: Limit | None
    breach_action: BreachMode
    strategy_breach_action: BreachMode

    def on_account(self, rule: MeasuredRule) -> Limit | None:
        """The limit of ``rule`` measured on the whole account (for a position: its position in the
        symbol), or ``None``."""
        limits: tuple[Limit, ...] = getattr(self, rule)
        return next((lim for lim in limits if lim.scope == "account"), None)


def _limit(section: SymbolRiskLimits | None, source: str, name: str, scope: Scope) -> Limit | None:
    value = None if section is None else getattr(section, name, None)
    return None if value is None else Limit(Decimal(value), f"{source}.{name}", scope)


def _tightest(candidates: Iterable[Limit | None]) -> Limit | None:
    """The smallest limit; on a tie the later (more specific) one."""
    found: Limit | None = None
    for lim in candidates:
        if lim is not None and (found is None or lim.value <= found.value):
            found = lim
    return found


def resolve_limits(config: RiskLimits, account: str, strategy: str, symbol: str) -> ResolvedLimits:
    """The limits of one route, every level holding (see the module docstring)."""
    acct: AccountRiskLimits | None = config.accounts.get(account)
    strat: StrategyRiskLimits | None = config.strategies.get(strategy)
    sym: SymbolRiskLimits | None = config.symbols.get(symbol)
    acct_source = f"risk.accounts.{account}"
    strat_source = f"risk.strategies.{strategy}"
    sym_source = f"risk.symbols.{symbol}"

    def account_level(name: str, scope: Scope = "account") -> Limit | None:
        return _limit(acct, acct_source, name, scope) or _limit(config, "risk", name, scope)

    def levels(name: str) -> tuple[Limit | None, Limit | None, Limit | None]:
        return (
            account_level(name),
            _limit(strat, strat_source, name, "strategy"),
            _limit(sym, sym_source, name, "symbol"),
        )

    def measured(name: str) -> tuple[Limit, ...]:
        return tuple(lim for lim in levels(name) if lim is not None)

    legacy = config.max_position_notional_by_symbol.get(symbol)
    symbol_position = _tightest(
        (
            None if legacy is None else Limit(legacy, f"risk.max_position_notional_by_symbol.{symbol}", "account"),
            _limit(sym, sym_source, "max_position_notional", "account"),
        )
    )
    account_position = _tightest((account_level("max_position_notional"), symbol_position))
    strategy_position = _limit(strat, strat_source, "max_position_notional", "strategy")
    action: BreachMode = config.breach_action
    if acct is not None and acct.breach_action is not None:
        action = acct.breach_action
    strategy_action: BreachMode = action
    if strat is not None and strat.breach_action is not None:
        strategy_action = strat.breach_action
    return ResolvedLimits(
        max_order_quantity=_tightest(levels("max_order_quantity")),
        max_order_notional=_tightest(levels("max_order_notional")),
        price_band_bps=_tightest(levels("price_band_bps")),
        max_position_notional=tuple(lim for lim in (account_position, strategy_position) if lim is not None),
        max_open_orders=measured("max_open_orders"),
        orders_per_minute=measured("orders_per_minute"),
        max_gross_exposure=account_level("max_gross_exposure"),
        max_net_exposure=account_level("max_net_exposure"),
        daily_loss_limit=account_level("daily_loss_limit"),
        max_drawdown_pct=account_level("max_drawdown_pct"),
        strategy_loss_limit=_tightest(
            (
                account_level("strategy_loss_limit", "strategy"),  # a strategy's loss, whichever level sets it
                _limit(strat, strat_source, "strategy_loss_limit", "strategy"),
            )
        ),
        breach_action=action,
        strategy_breach_action=strategy_action,
    )
