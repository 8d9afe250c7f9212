"""Candle timeframes ("1m", "5m", "1h", "1d", "1w") as exact durations."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from meltica.domain.values import require_utc
from meltica.errors import DataValidationError

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_PATTERN = re.compile(r"^([1-9][0-9]*)([smhdw])$")
_PARSED: dict[str, Timeframe] = {}  # text → its (immutable) Timeframe
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MONDAY = datetime(1970, 1, 5, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Timeframe:
    """A fixed-length bar interval. Months are refused: their length varies."""

    value: str
    seconds: int

    @classmethod
    def parse(cls, text: str) -> Timeframe:
        known = _PARSED.get(text) if isinstance(text, str) else None
        if known is not None:
            return known  # parsed on every bar in the live path: a regex each time showed in the profile
        match = _PATTERN.match(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ValueError(
                f"invalid timeframe {text!r}: expected <count><unit> with unit s, m, h, d or w (e.g. '5m')"
            )
        count, unit = int(match.group(1)), match.group(2)
        parsed = cls(value=f"{count}{unit}", seconds=count * _UNIT_SECONDS[unit])
        if cls is Timeframe and len(_PARSED) < 256:
            _PARSED[text] = parsed
        return parsed

    @property
    def delta(self) -> timedelta:
        return timedelta(seconds=self.seconds)

    def is_multiple_of(self, other: Timeframe | str) -> bool:
        """True when bars of ``other`` tile this timeframe exactly (5m is a multiple of 1m)."""
        base = other if isinstance(other, Timeframe) else Timeframe.parse(other)
        return self.seconds % base.seconds == 0

    def floor(self, ts: datetime) -> datetime:
        """Open time of the bar containing ``ts``.

        Bars align to the Unix epoch, as exchanges do; weeks align to Monday (the epoch was a
        Thursday), which is where Binance's and most venues' weekly candles open.
        """
        anchor = _MONDAY if self.seconds % _UNIT_SECONDS["w"] == 0 else _EPOCH
        elapsed = require_utc(ts) - anchor
        elapsed_seconds = elapsed.days * 86_400 + elapsed.seconds  # integer: no float rounding
        return anchor + timedelta(seconds=elapsed_seconds // self.seconds * self.seconds)

    def __str__(self) -> str:
        return self.value


def validate_timeframe(text: str) -> str:
    """Pydantic validator: canonical timeframe string or ``ValueError``."""
    return Timeframe.parse(text).value


def parse_timeframe(text: str) -> Timeframe:
    """Timeframe.parse with the data-error type the CLI reports as bad input."""
    try:
        return Timeframe.parse(text)
    except ValueError as exc:
        raise DataValidationError(str(exc), reason="invalid_timeframe") from None
