"""The built-in strategies; importing this package registers them."""

from meltica.strategies.builtin.grid import Grid, GridParams
from meltica.strategies.builtin.market_making import MarketMaking, MarketMakingParams
from meltica.strategies.builtin.mean_reversion import MeanReversion, MeanReversionParams
from meltica.strategies.builtin.momentum import Momentum, MomentumParams

__all__ = [
    "Grid",
    "GridParams",
    "MarketMaking",
    "MarketMakingParams",
    "MeanReversion",
    "MeanReversionParams",
    "Momentum",
    "MomentumParams",
]
