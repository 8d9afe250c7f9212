"""The pipeline's processor factory for ``python -m streams.worker`` (``factory: streams.pipeline:build_processors``).

Worker config ``params``::

    pipeline: {...}            # meltica.live.config.PipelineConfig (instances, accounts, lockstep, risk)
    stages: [candles, strategies, risk, execution]   # default: all four; split them over workers if you like
    emulators:                 # accounts whose venue is "emulator": where the emulator is, which key
      paper: {url: "http://127.0.0.1:8090", api_key: "...", api_secret: "..."}
    database_url: postgresql+psycopg://...   # optional: risk decisions recorded to risk_events

Every stage is a core object (``meltica.live``); this module only reads the config and builds them.
The sinks are not processors (they batch): ``register_extras`` adds them when ``params.sinks`` is true.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from meltica.domain.portfolio import Balance
from meltica.live.config import PipelineConfig
from meltica.live.execution import ExecutionService, PaperDriver
from meltica.live.marketdata import CandleProcessor
from meltica.live.processor import Processor
from meltica.live.risk_gate import RiskGate
from meltica.live.strategy_host import StrategyHost
from meltica.live.venue import VenueDriver
from meltica.portfolio import Portfolio
from meltica.risk import RiskConfig

STAGES = ("candles", "strategies", "risk", "execution")


def _drivers(config: PipelineConfig, emulators: Mapping[str, Mapping[str, Any]]) -> dict[str, VenueDriver]:
    drivers: dict[str, VenueDriver] = {}
    for account in config.account_names():
        settings = config.account(account)
        if settings.venue == "paper":
            drivers[account] = PaperDriver.from_config(config, account)
        elif settings.venue == "emulator":
            from meltica.live.emulator_driver import EmulatorDriver

            where = emulators.get(account)
            if where is None:
                raise ValueError(f"params.emulators.{account}: {account!r} trades on the emulator; give its url")
            drivers[account] = EmulatorDriver(
                str(where["url"]),
                account=account,
                api_key=str(where["api_key"]),
                api_secret=_resolve(str(where["api_secret"]), f"params.emulators.{account}.api_secret"),
                fees=settings.fees(),
            )
        else:
            raise ValueError(f"pipeline.accounts.{account}.venue: {settings.venue!r} is not wired into workers yet")
    return drivers


def _resolve(value: str, where: str) -> str:
    """``env:NAME`` → the variable's value (secrets stay out of config files)."""
    if not value.startswith("env:"):
        return value
    name = value[4:]
    if name not in os.environ:
        raise ValueError(f"{where}: environment variable {name} is not set")
    return os.environ[name]


def _risk_gate(config: PipelineConfig, database_url: str | None) -> RiskGate:
    instruments = {(i.exchange, i.symbol): i for a in config.account_names() for i in config.instruments(a)}
    # Starting balances matter for drawdown and loss limits (equity-based).
    portfolio = Portfolio()
    for account in config.account_names():
        settings = config.account(account)
        if settings.initial_balances:
            portfolio.set_balances(
                account,
                settings.exchange,
                {asset: Balance(asset=asset, free=amount) for asset, amount in settings.initial_balances.items()},
            )
    recorder = None
    if database_url:
        from meltica.risk.store import RiskRecorder
        from meltica.storage.engine import make_engine

        recorder = RiskRecorder(make_engine(database_url))
    return RiskGate(
        config.risk or RiskConfig(),
        instruments,
        lockstep=config.lockstep,
        recorder=recorder,
        portfolio=portfolio,
    )


def build_processors(worker_config: Mapping[str, Any]) -> list[Processor]:
    params = dict(worker_config.get("params") or {})
    config = PipelineConfig.model_validate(params["pipeline"])
    stages = tuple(params.get("stages") or STAGES)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"params.stages: unknown {unknown}; expected some of {list(STAGES)}")
    processors: list[Processor] = []
    if "candles" in stages:
        processors.append(CandleProcessor())
    if "strategies" in stages:
        processors.append(StrategyHost(config))
    if "risk" in stages:
        processors.append(_risk_gate(config, params.get("database_url")))
    if "execution" in stages:
        processors.append(ExecutionService(config, _drivers(config, params.get("emulators") or {})))
    return processors
