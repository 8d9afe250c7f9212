"""Parameter sets (grid, random), the process-pool sweep and its ranking."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from meltica.backtest.metrics import Metrics
from meltica.backtest.optimize import VectorEvaluator, grid, random_search, rank_runs, run_sweep
from meltica.backtest.vector import load_bars
from meltica.errors import ConfigurationError
from meltica.strategies import validate_params

DATA = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"


def test_grid_skips_and_counts_invalid_combinations() -> None:
    sets = grid({"fast": [5, 10, 60], "slow": [20, 50]}, strategy="momentum")
    assert [(p["fast"], p["slow"]) for p in sets] == [(5, 20), (5, 50), (10, 20), (10, 50)]
    assert sets.invalid == 2 and sets.skipped == 2
    assert "fast" in sets.reasons[0]
    for p in sets:
        validate_params("momentum", p)


def test_grid_without_strategy_is_the_plain_product_with_base() -> None:
    sets = grid({"a": [1, 2], "b": ["x"]}, base={"c": 0})
    assert sets.params == [{"c": 0, "a": 1, "b": "x"}, {"c": 0, "a": 2, "b": "x"}]


def test_random_search_is_reproducible_valid_and_in_range() -> None:
    first = random_search("momentum", 30, seed=3, ranges={"fast": (2, 30), "slow": (10, 60)})
    again = random_search("momentum", 30, seed=3, ranges={"fast": (2, 30), "slow": (10, 60)})
    other = random_search("momentum", 30, seed=4, ranges={"fast": (2, 30), "slow": (10, 60)})
    assert first.params == again.params != other.params
    assert len(first) == 30
    assert first.invalid > 0  # fast >= slow draws were skipped
    keys = {json.dumps(p, sort_keys=True) for p in first}
    assert len(keys) == 30
    for p in first:
        assert 2 <= p["fast"] < p["slow"] <= 60
        validate_params("momentum", p)


def test_random_search_defaults_to_the_model_bounds() -> None:
    sets = random_search("momentum", 5, seed=1)
    assert len(sets) == 5
    for p in sets:
        model = validate_params("momentum", p)
        assert model.model_dump()["fast"] == p["fast"]


def test_random_search_refuses_unknown_parameters() -> None:
    with pytest.raises(ConfigurationError):
        random_search("momentum", 3, ranges={"nope": (1, 2)})


def _metrics(value: float) -> dict[str, Any]:
    return {"sharpe": value, "max_drawdown": abs(value), "periods": 10}


def fake_evaluate(params: Mapping[str, Any]) -> Mapping[str, Any]:
    if params["x"] == 13:
        raise ValueError("unlucky")
    return _metrics(float(params["score"]))


def test_ranking_is_by_objective_with_ties_by_input_order() -> None:
    sets = [{"x": i, "score": s} for i, s in enumerate([1.0, 3.0, 3.0, float("nan"), 2.0])]
    result = run_sweep(fake_evaluate, sets, workers=1)
    assert [r.index for r in result.runs] == [1, 2, 4, 0, 3]
    assert [r.rank for r in result.runs] == [1, 2, 3, 4, 5]
    low = run_sweep(fake_evaluate, sets, workers=1, objective="max_drawdown")
    assert not low.maximize
    assert [r.index for r in low.runs] == [0, 4, 1, 2, 3]


def test_failures_are_reported_not_raised() -> None:
    result = run_sweep(fake_evaluate, [{"x": 13, "score": 1}, {"x": 1, "score": 1}], workers=1)
    assert [r.index for r in result.runs] == [1]
    assert result.failed[0].error == "ValueError: unlucky"


def test_unknown_objective_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        run_sweep(fake_evaluate, [], objective="nope")


def test_process_pool_gives_the_same_ranking_as_one_process(tmp_path: Path) -> None:
    data = load_bars(DATA).slice(0, 8000).save_npz(tmp_path / "bars.npz")
    sets = grid({"fast": [5, 8, 12, 20], "slow": [30, 50, 90]}, strategy="momentum")
    evaluate = VectorEvaluator(str(data), mode="cross", allow_short=True)
    one = run_sweep(evaluate, sets, workers=1, objective="total_return")
    two = run_sweep(evaluate, sets, workers=2, chunksize=3, objective="total_return")
    assert two.workers == 2
    assert [(r.params, r.metrics) for r in two.runs] == [(r.params, r.metrics) for r in one.runs]
    assert one.evaluations == 8000 * 12
    assert isinstance(one.best.metrics if one.best else None, Metrics)
    written = one.write(tmp_path / "out")
    rows = (tmp_path / "out" / "sweep.csv").read_text().splitlines()
    assert len(rows) == 13 and rows[0].startswith("rank,index,run_id,param.fast,param.slow")
    doc = json.loads(written[1].read_text())
    assert doc["runs"][0]["rank"] == 1 and doc["objective"] == "total_return"


def test_rank_runs_puts_failed_metrics_last() -> None:
    from meltica.backtest.optimize import SweepRun

    runs = [SweepRun(0, {}, None), SweepRun(1, {}, None)]
    assert [r.rank for r in rank_runs(runs, "sharpe", True)] == [1, 2]
