"""A validation error never echoes a rejected value: the settings file's sections, the live pipeline's
configuration and strategy parameters name the field and the rule only (the value may be a secret)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from meltica.config import load_settings
from meltica.errors import ConfigurationError
from meltica.live.config import AccountVenueConfig, PipelineConfig, StrategyInstanceConfig
from meltica.strategies.base import StrategyParams

SECRET = "rejected-secret-value-31337"


class TokenParams(StrategyParams):
    threshold: int = 1


@pytest.mark.parametrize(
    ("model", "data"),
    [
        (StrategyInstanceConfig, {"instance_id": "a", "strategy": "m", "account": f"x:{SECRET}", "exchange": "e"}),
        (
            StrategyInstanceConfig,
            {"instance_id": "a", "strategy": "m", "account": "x", "symbols": ["B/U"], "api_key": SECRET},
        ),
        (AccountVenueConfig, {"exchange": "binance", "venue": SECRET}),
        (AccountVenueConfig, {"exchange": "binance", "api_secret": SECRET}),
        (PipelineConfig, {"instances": [], "accounts": {}, "risk": SECRET}),
        (TokenParams, {"threshold": SECRET}),
        (TokenParams, {"api_token": SECRET}),
    ],
)
def test_live_and_strategy_validation_errors_never_echo_the_value(model: type[BaseModel], data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(data)
    assert SECRET not in str(caught.value)


def test_settings_file_validation_error_never_echoes_a_secret(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(
        f"accounts:\n  - name: a\n    exchange: binance\n    api_secret: [{SECRET}]\n    api_sekret: {SECRET}\n"
    )
    with pytest.raises(ConfigurationError) as caught:
        load_settings(config_file=path)
    assert "api_secret" in str(caught.value)
    assert SECRET not in str(caught.value)
