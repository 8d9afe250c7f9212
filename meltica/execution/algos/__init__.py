"""Execution algorithms that work a parent intent through many child orders (TWAP)."""

from meltica.execution.algos.twap import Twap, TwapState, TwapStatus

__all__ = ["Twap", "TwapState", "TwapStatus"]
