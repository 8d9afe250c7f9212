"""``SimulatedVenueSettings``: what a simulated venue account is set to — one model, one conversion.

Fees and slippage are in basis points (10 bps = 0.1 %). ``BacktestConfig`` (a backtest run) and the live
pipeline's ``AccountVenueConfig`` (a paper account) are both these settings, so ``meltica paper`` runs a
backtest's account with exactly its fees, fill model and latency.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from meltica.matching import FeeSchedule, FillModel

_BPS = Decimal(10_000)


class SimulatedVenueSettings(BaseModel):
    """Initial balances, maker/taker fees, slippage, latency and partial-fill cap of a simulated account."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    initial_balances: dict[str, Decimal] = Field(default_factory=dict, description="asset -> amount")
    maker_fee_bps: Decimal = Field(Decimal(10), ge=-100, le=1000)
    taker_fee_bps: Decimal = Field(Decimal(10), ge=-100, le=1000)
    fee_asset: Literal["quote", "received"] = Field(
        "quote", description="commission in the quote currency (default) or in the asset received"
    )
    slippage_bps: Decimal = Field(Decimal(0), ge=0, le=1000, description="distance of the first synthetic level")
    latency_ms: int = Field(0, ge=0, description="decision -> arrival at the venue")
    bar_volume_share: Decimal | None = Field(None, gt=0, le=1, description="partial-fill cap per bar")
    fill_on_touch: bool = False

    def fees(self) -> FeeSchedule:
        return FeeSchedule(
            maker=self.maker_fee_bps / _BPS,
            taker=self.taker_fee_bps / _BPS,
            quote_commission=self.fee_asset == "quote",
        )

    def fill_model(self) -> FillModel:
        """Slippage ``s`` bps = the synthetic book's first level ``s`` bps from the reference price
        (``synthetic_spread_bps = 2 s``); deeper levels sit ``3 s``, ``5 s`` … away."""
        return FillModel(
            fill_on_touch=self.fill_on_touch,
            synthetic_spread_bps=self.slippage_bps * 2,
            bar_volume_share=self.bar_volume_share,
        )

    @property
    def latency(self) -> timedelta:
        return timedelta(milliseconds=self.latency_ms)

    def venue_settings(self) -> dict[str, Any]:
        """These settings as keywords (for another ``SimulatedVenueSettings`` that reproduces them)."""
        return {name: getattr(self, name) for name in SimulatedVenueSettings.model_fields}
