"""Strategies: one interface that runs unchanged in backtests, paper trading and live (README.md here).

A strategy subclasses :class:`Strategy`, declares a pydantic ``Params`` model, registers with
``@register_strategy`` and talks to the world only through its :class:`StrategyContext`.
"""

from meltica.strategies.base import (
    OrderList,
    OrderListKind,
    Strategy,
    StrategyContext,
    StrategyParams,
    dec,
    dstr,
    json_copy,
)
from meltica.strategies.registry import (
    ParamSpec,
    build_strategy,
    get_strategy,
    list_strategies,
    param_space,
    register_strategy,
    resolve_strategy,
    strategy_sources,
    use_strategy_directories,
    validate_params,
)

__all__ = [
    "OrderList",
    "OrderListKind",
    "ParamSpec",
    "Strategy",
    "StrategyContext",
    "StrategyParams",
    "build_strategy",
    "dec",
    "dstr",
    "get_strategy",
    "json_copy",
    "list_strategies",
    "param_space",
    "register_strategy",
    "resolve_strategy",
    "strategy_sources",
    "use_strategy_directories",
    "validate_params",
]
