"""``PipelineConfig``: which strategy instances a live pipeline runs, and the simulated venue of each
account (paper runs).

An instance trades one account on one exchange (``symbols`` on it); several instances may share an
account. ``accounts`` maps an account to its venue settings: for a paper venue the initial balances,
fees, fill model and latency (the same knobs and meaning as ``meltica.backtest.BacktestConfig``), and
the instruments it lists. ``PipelineConfig.from_backtest`` turns a backtest configuration into the
one-instance pipeline that reproduces it (``meltica paper``: parity with ``meltica backtest``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from meltica.backtest.config import BacktestConfig, default_instrument
from meltica.domain import Instrument, Timeframe
from meltica.risk import RiskConfig
from meltica.sim.config import SimulatedVenueSettings


class StrategyInstanceConfig(BaseModel):
    """One strategy instance: which strategy, its parameters, where it trades."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    instance_id: str = Field(min_length=1, max_length=128, pattern=r"^[^:]+$")
    strategy: str = Field(min_length=1, description="registered strategy name")
    params: dict[str, Any] = Field(default_factory=dict)
    account: str = Field(min_length=1, pattern=r"^[^:]+$")
    exchange: str = Field(min_length=1, pattern=r"^[^:]+$")
    symbols: tuple[str, ...] = Field(min_length=1)
    timeframe: str = "1m"

    @field_validator("timeframe")
    @classmethod
    def _timeframe(cls, value: str) -> str:
        Timeframe.parse(value)
        return value


class AccountVenueConfig(SimulatedVenueSettings):
    """The venue of one account. ``venue="paper"``: an ``InProcessVenue`` with these settings (the
    simulated account's: ``SimulatedVenueSettings``, as a backtest's); ``"emulator"`` / ``"exchange"``: the
    settings that apply (instruments, latency in lock-step replays) and the rest ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True, hide_input_in_errors=True)

    exchange: str = Field(min_length=1)
    venue: Literal["paper", "emulator", "exchange"] = "paper"
    instruments: tuple[Instrument, ...] = ()


class PipelineConfig(BaseModel):
    """The strategy instances, the accounts' venues, lock-step or live, and the risk limits."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True, hide_input_in_errors=True)

    instances: tuple[StrategyInstanceConfig, ...] = ()
    accounts: dict[str, AccountVenueConfig] = Field(default_factory=dict)
    lockstep: bool = False
    risk: RiskConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        seen: set[str] = set()
        for inst in self.instances:
            if inst.instance_id in seen:
                raise ValueError(f"instance {inst.instance_id!r} is configured twice")
            seen.add(inst.instance_id)
            account = self.accounts.get(inst.account)
            if account is not None and account.exchange != inst.exchange:
                raise ValueError(
                    f"instance {inst.instance_id} trades {inst.exchange}, "
                    f"account {inst.account} is on {account.exchange}"
                )
        return self

    # --- reads ---------------------------------------------------------------------------------
    def instance(self, instance_id: str) -> StrategyInstanceConfig:
        for inst in self.instances:
            if inst.instance_id == instance_id:
                return inst
        raise KeyError(instance_id)

    def account(self, name: str) -> AccountVenueConfig:
        """The account's venue settings; an unlisted account gets a default paper venue on the exchange
        its instances trade."""
        found = self.accounts.get(name)
        if found is not None:
            return found
        exchanges = {i.exchange for i in self.instances if i.account == name}
        if len(exchanges) != 1:
            raise KeyError(f"account {name!r} is not configured")
        return AccountVenueConfig(exchange=exchanges.pop())

    def account_names(self) -> list[str]:
        return sorted(set(self.accounts) | {i.account for i in self.instances})

    def instruments(self, account: str) -> list[Instrument]:
        """The account's instruments: as configured, plus the built-in precision for every other symbol
        its instances trade (``meltica.backtest.config.default_instrument``)."""
        settings = self.account(account)
        listed = {i.symbol: i for i in settings.instruments}
        for inst in self.instances:
            if inst.account != account:
                continue
            for symbol in inst.symbols:
                if symbol not in listed:
                    listed[symbol] = default_instrument(settings.exchange, symbol)
        return [i if i.exchange == settings.exchange else i.model_copy(update={"exchange": settings.exchange})
                for i in listed.values()]  # fmt: skip

    def instances_trading(self, account: str, exchange: str, symbol: str) -> list[StrategyInstanceConfig]:
        return [i for i in self.instances if i.account == account and i.exchange == exchange and symbol in i.symbols]

    # --- from a backtest -----------------------------------------------------------------------
    @classmethod
    def from_backtest(cls, config: BacktestConfig, *, lockstep: bool = True) -> PipelineConfig:
        """The pipeline that runs ``config`` as a paper run: same instance id, account, exchange, symbol,
        parameters, balances, fees, fill model, latency, instrument and risk limits."""
        instrument = config.market()
        if instrument.exchange != config.exchange:
            instrument = instrument.model_copy(update={"exchange": config.exchange})
        return cls(
            instances=(
                StrategyInstanceConfig(
                    instance_id=config.strategy_instance,
                    strategy=config.strategy,
                    params=dict(config.params),
                    account=config.account,
                    exchange=config.exchange,
                    symbols=(config.symbol,),
                    timeframe=config.timeframe,
                ),
            ),
            accounts={
                config.account: AccountVenueConfig(
                    **{**config.venue_settings(), "initial_balances": config.balances()},
                    exchange=config.exchange,
                    venue="paper",
                    instruments=(instrument,),
                )
            },
            lockstep=lockstep,
            risk=config.risk,
        )
