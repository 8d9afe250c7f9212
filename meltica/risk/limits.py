"""Limits resolved for one (account, strategy, symbol): the configuration's overrides applied once.

Precedence, field by field: ``risk`` defaults < ``risk.accounts.<a>`` < ``risk.strategies.<s>`` <
``risk.symbols.<sym>`` (``max_position_notional_by_symbol`` counts as a symbol override). Each resolved
value remembers where it came from (``source``: the YAML path) so a rejection can name it, and the
*scope it is measured on* follows from that source:

* position, open orders and order rate set for a **strategy** are measured on that strategy's own
  orders and positions in the account;
* set for a **symbol**, open orders and order rate count the account's orders in that symbol
  (a position is always per symbol);
* otherwise (defaults, account) they are measured on the whole account.

Resolution happens once per route and is cached by the engine: no pydantic work per check.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from meltica.config.settings import AccountRiskLimits, RiskLimits, StrategyRiskLimits, SymbolRiskLimits

RiskConfig = RiskLimits  # the name the execution contract uses (meltica/execution/README.md)

Scope = Literal["account", "strategy", "symbol"]
BreachMode = Literal["halt", "reduce_only"]


@dataclass(frozen=True, slots=True)
class Limit:
    """One resolved limit: its value and the configuration path it came from."""

    value: Decimal
    source: str  # e.g. "risk.symbols.BTC/USDT.max_order_quantity"
    scope: Scope = "account"

    def __str__(self) -> str:
        return f"{self.value} ({self.source})"


@dataclass(frozen=True, slots=True)
class ResolvedLimits:
    """Every limit that applies to one (account, strategy, symbol); ``None``: no limit."""

    max_order_quantity: Limit | None
    max_order_notional: Limit | None
    max_position_notional: Limit | None
    max_open_orders: Limit | None
    price_band_bps: Limit | None
    orders_per_minute: Limit | None
    max_gross_exposure: Limit | None
    max_net_exposure: Limit | None
    daily_loss_limit: Limit | None
    max_drawdown_pct: Limit | None
    strategy_loss_limit: Limit | None
    breach_action: BreachMode
    strategy_breach_action: BreachMode


_PER_ROUTE = (
    "max_order_quantity",
    "max_order_notional",
    "max_position_notional",
    "max_open_orders",
    "price_band_bps",
    "orders_per_minute",
)
_PER_ACCOUNT = ("max_gross_exposure", "max_net_exposure", "daily_loss_limit", "max_drawdown_pct")


def _pick(
    name: str,
    levels: list[tuple[str, Scope, SymbolRiskLimits | None]],
) -> Limit | None:
    found: Limit | None = None
    for source, scope, section in levels:
        if section is None:
            continue
        value = getattr(section, name, None)
        if value is not None:
            found = Limit(Decimal(value), f"{source}.{name}", scope)
    return found


def resolve_limits(config: RiskLimits, account: str, strategy: str, symbol: str) -> ResolvedLimits:
    """The limits of one route, most specific winning (see the module docstring)."""
    acct: AccountRiskLimits | None = config.accounts.get(account)
    strat: StrategyRiskLimits | None = config.strategies.get(strategy)
    sym: SymbolRiskLimits | None = config.symbols.get(symbol)
    legacy_position = config.max_position_notional_by_symbol.get(symbol)
    levels: list[tuple[str, Scope, SymbolRiskLimits | None]] = [
        ("risk", "account", config),
        (f"risk.accounts.{account}", "account", acct),
        (f"risk.strategies.{strategy}", "strategy", strat),
        (f"risk.symbols.{symbol}", "symbol", sym),
    ]
    picked = {name: _pick(name, levels) for name in _PER_ROUTE}
    position = picked["max_position_notional"]
    if legacy_position is not None and (position is None or position.scope != "symbol"):
        position = Limit(legacy_position, f"risk.max_position_notional_by_symbol.{symbol}", "symbol")
    if position is not None and position.scope == "symbol":
        # A per-symbol position limit applies to the account's position in that symbol.
        position = Limit(position.value, position.source, "account")
    picked["max_position_notional"] = position
    account_levels = levels[:2]
    per_account = {name: _pick(name, account_levels) for name in _PER_ACCOUNT}
    strategy_loss = _pick("strategy_loss_limit", levels[:3])
    action: BreachMode = config.breach_action
    if acct is not None and acct.breach_action is not None:
        action = acct.breach_action
    strategy_action: BreachMode = action
    if strat is not None and strat.breach_action is not None:
        strategy_action = strat.breach_action
    return ResolvedLimits(
        max_order_quantity=picked["max_order_quantity"],
        max_order_notional=picked["max_order_notional"],
        max_position_notional=picked["max_position_notional"],
        max_open_orders=picked["max_open_orders"],
        price_band_bps=picked["price_band_bps"],
        orders_per_minute=picked["orders_per_minute"],
        max_gross_exposure=per_account["max_gross_exposure"],
        max_net_exposure=per_account["max_net_exposure"],
        daily_loss_limit=per_account["daily_loss_limit"],
        max_drawdown_pct=per_account["max_drawdown_pct"],
        strategy_loss_limit=strategy_loss,
        breach_action=action,
        strategy_breach_action=strategy_action,
    )
