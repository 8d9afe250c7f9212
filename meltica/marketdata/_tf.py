"""TEMPORARY until meltica.domain provides Timeframe."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from meltica.errors import DataValidationError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class Timeframe:
    value: str
    delta: timedelta

    @classmethod
    def parse(cls, text: str) -> Timeframe:
        m = re.fullmatch(r"(\d+)([smhdw])", text.strip())
        if not m or int(m.group(1)) == 0:
            raise DataValidationError(f"invalid timeframe {text!r}: expected e.g. 1m, 5m, 1h, 1d")
        return cls(text.strip(), timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)]))

    def __str__(self) -> str:
        return self.value
