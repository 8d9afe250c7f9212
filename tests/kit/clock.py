"""A clock the test sets by hand: the code under test calls it, the test moves ``now``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from meltica.sim.clock import ManualClock as SimulationClock

DEFAULT_START = datetime(2024, 1, 1, tzinfo=UTC)


class ManualClock(SimulationClock):
    """The simulation's clock (``meltica.sim.clock``) with a default start, a check that times are aware, an
    ``advance`` and an optional ``tick`` that moves it forward *before* each reading, for code that must see
    time pass between two calls (e.g. a credential's created/rotated stamps)."""

    def __init__(self, now: datetime = DEFAULT_START, *, tick: timedelta | None = None) -> None:
        if now.tzinfo is None:
            raise ValueError("a test clock reads aware UTC times")
        super().__init__(now)
        self.tick = tick

    def __call__(self) -> datetime:
        if self.tick is not None:
            self.now += self.tick
        return self.now

    def advance(self, delta: timedelta | None = None, /, **parts: float) -> datetime:
        """Move ``now`` forward by ``delta`` or ``timedelta(**parts)``; returns the new time."""
        self.now += delta if delta is not None else timedelta(**parts)
        return self.now
