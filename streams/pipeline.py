"""The pipeline's processor factory for ``python -m streams.worker`` (``factory: streams.pipeline:build_processors``).

Worker config ``params``::

    pipeline: {...}            # meltica.live.config.PipelineConfig (instances, accounts, lockstep, risk)
    stages: [candles, strategies, risk, execution]   # default: all four; split them over workers if you like
    emulators:                 # accounts whose venue is "emulator": where the emulator is, which key
      paper: {url: "http://127.0.0.1:8090", api_key: "...", api_secret: env:NAME, admin_token: env:NAME}
    database_url: postgresql+psycopg://...   # optional: risk decisions recorded to risk_events

Every stage is a core object (``meltica.live``); this module only reads the config and builds them.
The sinks are not processors (they batch): ``register_extras`` adds them when ``params.sinks`` is true.

Live deployments (``python -m streams.worker --settings FILE --worker NAME``) are built by
:func:`build_live_processors` from the settings file instead (``meltica.live.deployment``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from meltica.domain.portfolio import Balance
from meltica.errors import ConfigurationError
from meltica.live import deployment
from meltica.live.config import PipelineConfig
from meltica.live.execution import ExecutionService
from meltica.live.live_driver import LiveDriver
from meltica.live.marketdata import CandleProcessor
from meltica.live.processor import Processor
from meltica.live.risk_gate import RiskGate
from meltica.live.simulated_driver import SimulatedVenueDriver
from meltica.live.strategy_host import StrategyHost
from meltica.live.venue import VenueDriver
from meltica.portfolio import Portfolio
from meltica.risk import RiskConfig

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from meltica.config.settings import MelticaSettings
    from meltica.risk import KillSwitchState

log = logging.getLogger(__name__)

STAGES = ("candles", "strategies", "risk", "execution")


def _drivers(config: PipelineConfig, emulators: Mapping[str, Mapping[str, Any]]) -> dict[str, VenueDriver]:
    drivers: dict[str, VenueDriver] = {}
    for account in config.account_names():
        settings = config.account(account)
        if settings.venue == "paper":
            drivers[account] = SimulatedVenueDriver.from_config(config, account)
        elif settings.venue == "emulator":
            from meltica.live.emulator_driver import EmulatorDriver

            where = emulators.get(account)
            if where is None:
                raise ValueError(f"params.emulators.{account}: {account!r} trades on the emulator; give its url")
            drivers[account] = EmulatorDriver(
                str(where["url"]),
                account=account,
                api_key=_resolve(str(where["api_key"]), f"params.emulators.{account}.api_key"),
                api_secret=_resolve(str(where["api_secret"]), f"params.emulators.{account}.api_secret"),
                admin_token=_resolve(
                    _required(where, "admin_token", account), f"params.emulators.{account}.admin_token"
                ),
                fees=settings.fees(),
            )
        else:
            raise ValueError(f"pipeline.accounts.{account}.venue: {settings.venue!r} is not wired into workers yet")
    return drivers


def _required(where: Mapping[str, Any], key: str, account: str) -> str:
    if not where.get(key):
        raise ValueError(
            f"params.emulators.{account}.{key} is missing (the emulator's; env:NAME keeps it out of the file)"
        )
    return str(where[key])


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


# --- live deployments (the settings file) ----------------------------------------------------------------


class StartRefusedError(RuntimeError):
    """The worker cannot start safely (e.g. the persisted kill switch cannot be read): it does not start."""


def persisted_kill_switch(engine: Engine) -> dict[str, KillSwitchState]:
    """The kill switch as the database holds it; :class:`StartRefusedError` when it cannot be read (fail closed:
    a worker that cannot know whether trading is halted does not trade)."""
    from meltica.risk import KillSwitchStore

    try:
        states = KillSwitchStore(engine).load()
    except Exception as exc:
        raise StartRefusedError(f"cannot read the kill switch from the database ({exc}): refusing to start") from exc
    for scope, state in sorted(states.items()):
        if state.engaged:
            log.warning("kill switch %s is %s (%s, by %s) at start", scope, state.mode, state.reason, state.actor)
    return states


async def build_live_processors(settings: MelticaSettings, stages: Sequence[str], engine: Engine) -> list[Processor]:
    """The processors of one worker of a live deployment: ``stages`` of the pipeline built from ``settings``
    (``meltica.live.deployment.pipeline_config``), the persisted kill switch read first (every stage obeys
    it from its first message), the risk gate on ``settings.risk`` recording to the database, the execution
    stage on the OMS's PostgreSQL store with one venue driver per account."""
    from meltica.risk import KillSwitchStore
    from meltica.risk.store import RiskRecorder

    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"live.workers: unknown stages {unknown}; expected some of {list(STAGES)}")
    kill_states = persisted_kill_switch(engine)
    drivers: dict[str, VenueDriver] = {}
    instruments: dict[str, list[Any]] = {}
    config = deployment.pipeline_config(settings)
    if "execution" in stages:
        drivers, instruments = await _live_drivers(settings, config, engine)
        config = deployment.pipeline_config(settings, instruments)
    processors: list[Processor] = []
    if "candles" in stages:
        processors.append(CandleProcessor())
    if "strategies" in stages:
        # A new namespace for the ids of instances that start without state (see StrategyHost).
        epoch = format(int(_wall_clock().timestamp() * 1000), "x")
        processors.append(StrategyHost(config, kill_switch_at_start=kill_states, id_epoch=epoch))
    if "risk" in stages:
        markets = {(i.exchange, i.symbol): i for a in config.account_names() for i in config.instruments(a)}
        processors.append(
            RiskGate(
                settings.risk,
                markets,
                lockstep=False,
                recorder=RiskRecorder(engine),
                portfolio=Portfolio(),
                kill_switch_at_start=kill_states,
                # a breach's halt is stored as `meltica kill` stores one: a worker (re)started later obeys it
                kill_switch_store=KillSwitchStore(engine),
                wall_clock=_wall_clock,
            )
        )
    if "execution" in stages:
        from meltica.execution.emulation_store import DurableHeldOrderStore, SqlEmulationStore
        from meltica.execution.store import OrderStore

        extra: dict[str, Any] = {"on_lane_start": _reconcile_lanes(settings, engine, drivers)}
        processors.append(
            ExecutionService(
                config,
                drivers,
                store=OrderStore(engine),
                kill_switch_at_start=kill_states,
                # stops the emulation holds for the OMS survive a restart with the orders the venue holds
                emulation_store=lambda account: DurableHeldOrderStore(SqlEmulationStore(engine, account=account)),
                **extra,
            )
        )
    return processors


def _wall_clock() -> datetime:
    return datetime.now(UTC)


def _reconcile_lanes(settings: MelticaSettings, engine: Engine, drivers: Mapping[str, VenueDriver]) -> Any:
    """The execution stage's per-account start hook (``meltica.reconciliation.startup``): a venue account is
    reconciled before its first order (``live.reconcile.at_start``; its balances seed the portfolio either
    way), again after every user-stream reconnect (``after_reconnect``) and every ``interval_s`` seconds. A
    paper account (an in-process venue, new in every process) has nothing to reconcile. Fail closed: a
    reconciliation that cannot run after start halts the account in this stage and says so."""
    from meltica.reconciliation.startup import bind, every, startup_hook

    policy = settings.live.reconcile
    at_start = startup_hook(engine, settings)
    tasks: list[asyncio.Task[None]] = []

    def halting(
        account: str, oms: Any, trigger: str, run: Callable[[], Awaitable[None]]
    ) -> Callable[[], Awaitable[None]]:
        async def guarded() -> None:
            try:
                await run()
            except Exception as exc:
                log.critical("account %s: %s reconciliation failed (%r): account halted", account, trigger, exc)
                oms.kill_switch.engage(
                    "halt", f"{trigger} reconciliation failed: {exc!r}", "reconciliation", scope=f"account:{account}"
                )
                # No re-raise: the account stays halted here; the next run (schedule) tries again.

        return guarded

    async def on_lane_start(account: str, adapter: Any, oms: Any, portfolio: Any) -> None:
        if deployment.account_venue(settings, account) == "paper":
            return
        await at_start(account, adapter, oms, portfolio)
        driver = drivers.get(account)
        if policy.after_reconnect and isinstance(driver, LiveDriver):
            hook = startup_hook(engine, settings, trigger="reconnect")
            driver.on_reconnect = halting(account, oms, "reconnect", bind(hook, account, adapter, oms, portfolio))
        if policy.interval_s > 0:
            hook = startup_hook(engine, settings, trigger="schedule")
            run = halting(account, oms, "scheduled", bind(hook, account, adapter, oms, portfolio))
            tasks.append(asyncio.get_running_loop().create_task(every(policy.interval_s, run)))

    return on_lane_start


async def _live_drivers(
    settings: MelticaSettings, config: PipelineConfig, engine: Engine
) -> tuple[dict[str, VenueDriver], dict[str, list[Any]]]:
    """One driver per account: the paper venue for ``exchange: paper``, else the live driver over the
    account's adapter (credentials: references, else the credential store). The instruments of every
    venue account are the venue's own."""
    store = deployment.credential_store(engine)
    drivers: dict[str, VenueDriver] = {}
    instruments: dict[str, list[Any]] = {}
    for account in config.account_names():
        if deployment.account_venue(settings, account) == "paper":
            drivers[account] = SimulatedVenueDriver.from_config(config, account)
            continue
        adapter = deployment.account_adapter(settings, account, store=store)
        symbols = [i.symbol for i in config.instruments(account)]
        try:
            instruments[account] = await deployment.venue_instruments(adapter, symbols)
        except ConfigurationError:
            raise
        except Exception as exc:  # venue not reachable yet: the driver reconnects; precision from defaults
            log.warning("account %s: instruments not loaded from %s (%r): built-in precision used",
                        account, adapter.exchange_id, exc)  # fmt: skip
        drivers[account] = LiveDriver(adapter, account=account)
    return drivers, instruments
