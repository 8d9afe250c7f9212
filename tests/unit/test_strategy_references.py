"""Strategy references resolved in-process: a file, a module, a strategies directory; a live deployment whose
instance names a strategy that cannot load is refused before anything starts."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from meltica.config.loader import live_problems, load_settings
from meltica.config.settings import AccountConfig, LiveInstance, LiveSettings, MelticaSettings
from meltica.errors import ConfigurationError
from meltica.strategies import get_strategy, registry, strategy_sources, validate_params

STRATEGY = """
from typing import ClassVar

from meltica.strategies import Strategy, StrategyParams, register_strategy


class P(StrategyParams):
    period: int = 14


@register_strategy
class {cls}(Strategy[P]):
    name: ClassVar[str] = "{name}"
    Params: ClassVar[type[P]] = P
"""


def write(path: Path, cls: str, name: str) -> Path:
    path.write_text(STRATEGY.format(cls=cls, name=name))
    return path


def test_a_file_reference_loads_and_registers_under_its_name(tmp_path: Path) -> None:
    write(tmp_path / "mine.py", "Mine", "unit_file_strategy")
    cls = get_strategy(f"{tmp_path / 'mine.py'}:Mine")
    assert cls.name == "unit_file_strategy"
    assert get_strategy("unit_file_strategy") is cls
    assert strategy_sources()["unit_file_strategy"] == str(tmp_path / "mine.py")
    assert validate_params(f"{tmp_path / 'mine.py'}:Mine", {"period": 3}).model_dump() == {"period": 3}


def test_a_module_reference_imports_from_sys_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "unit_module_strats.py", "Mod", "unit_module_strategy")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_strategy("unit_module_strats:Mod").name == "unit_module_strategy"
    assert strategy_sources()["unit_module_strategy"] == "module unit_module_strats"
    sys.modules.pop("unit_module_strats", None)


def test_a_strategies_directory_from_the_configuration_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # loading the settings exports the directories to the environment (for child processes): undone after.
    # setenv first, so monkeypatch restores the variable's absence too (delenv of an absent variable records
    # nothing, and the export leaked into later tests of the same process, e.g. on a pytest-xdist worker).
    monkeypatch.setenv("MELTICA_STRATEGY_PATHS", "")
    monkeypatch.delenv("MELTICA_STRATEGY_PATHS")
    monkeypatch.setattr(registry, "_directories", [])
    directory = tmp_path / "strategies"
    directory.mkdir()
    write(directory / "dir_one.py", "One", "unit_directory_strategy")
    config = tmp_path / "settings.yaml"
    config.write_text(f"strategy_paths: [{json.dumps(str(directory))}]\n")
    settings = load_settings(config_file=config)
    assert settings.strategy_paths == [directory]
    assert get_strategy("unit_directory_strategy").name == "unit_directory_strategy"
    assert json.loads(os.environ["MELTICA_STRATEGY_PATHS"]) == [str(directory)]  # what worker processes read


def test_a_missing_strategies_directory_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MELTICA_STRATEGY_PATHS", json.dumps([str(tmp_path / "nowhere")]))
    with pytest.raises(ConfigurationError, match="does not exist"):
        get_strategy("momentum")


def test_a_live_instance_whose_strategy_cannot_load_is_a_live_problem(tmp_path: Path) -> None:
    write(tmp_path / "live_one.py", "LiveOne", "unit_live_strategy")

    def settings(strategy: str, **params: object) -> MelticaSettings:
        instance = LiveInstance(
            instance_id="i1", strategy=strategy, params=dict(params), account="a", symbols=["BTC/USDT"]
        )
        return MelticaSettings(
            accounts=[AccountConfig(name="a", exchange="binance")], live=LiveSettings(instances=[instance])
        )

    assert live_problems(settings(f"{tmp_path / 'live_one.py'}:LiveOne", period=5)) == []
    [(where, why)] = live_problems(settings(f"{tmp_path / 'gone.py'}:LiveOne"))
    assert where == ("live", "instances", 0, "strategy")
    assert "does not exist" in why
    [(_, why)] = live_problems(settings(f"{tmp_path / 'live_one.py'}:LiveOne", period="x"))
    assert "period" in why
