"""The run forms Prefect builds from the flows' signatures and docstrings (what the UI's "Run" form shows)."""

from __future__ import annotations

from typing import Any

import pytest
from prefect.utilities.callables import parameter_schema

from flows.backtest import backtest, sweep
from flows.candles import import_candle_file
from flows.ingest import ingest
from flows.reconcile import reconcile
from flows.risk_report import daily_risk_report
from meltica.strategies.registry import list_strategies

FLOWS: list[Any] = [backtest, sweep, import_candle_file, ingest, reconcile, daily_risk_report]


@pytest.mark.parametrize("flow", FLOWS, ids=lambda f: f.name)
def test_every_parameter_of_the_run_form_has_a_description(flow: Any) -> None:
    properties = parameter_schema(flow.fn).model_dump()["properties"]
    undocumented = sorted(name for name, spec in properties.items() if not spec.get("description"))
    assert not undocumented, f"{flow.name}: {undocumented}"


@pytest.mark.parametrize("flow", [backtest, sweep], ids=lambda f: f.name)
def test_strategy_is_a_choice_of_the_registered_strategies(flow: Any) -> None:
    strategy = parameter_schema(flow.fn).model_dump()["properties"]["strategy"]
    # The strategies registered when the flow module was imported (other tests may register more later).
    assert strategy["type"] == "string" and {"momentum", "mean_reversion", "grid"} <= set(strategy["enum"])
    assert set(strategy["enum"]) <= set(list_strategies())
