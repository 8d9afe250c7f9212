"""``ManualClock``: the clock of a simulation, set by whoever drives it."""

from __future__ import annotations

from datetime import datetime


class ManualClock:
    """A simulated clock: whoever drives the simulation sets it; everything else reads it."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now
