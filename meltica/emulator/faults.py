"""Fault knobs: make the emulator misbehave the way the real venue sometimes does.

Settable from Python (``emu.faults.fail_next = 2``) or over HTTP (``POST /_emulator/faults`` with a
JSON object of the same field names, plus ``"drop_websockets": true`` to drop every WebSocket now).
Counters (``*_next``) are consumed one per matching request; the admin endpoint is never affected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

LostResponseMode = Literal["close", "hang"]


@dataclass
class Faults:
    # Added to every REST answer and every WebSocket API answer, in milliseconds.
    latency_ms: float = 0.0
    # The next N REST requests answer ``fail_status`` (5xx) with Binance's -1001 body; not executed.
    fail_next: int = 0
    fail_status: int = 503
    # The next N REST requests answer 429 + ``Retry-After`` with Binance's -1003 body; not executed.
    rate_limit_next: int = 0
    # The next N REST requests answer 418 (IP ban) + ``Retry-After``; not executed.
    ban_next: int = 0
    retry_after_s: int = 1
    # The next N order requests (new order, cancel-replace) ARE executed, but the answer is lost:
    # "close" aborts the connection, "hang" withholds it until the client gives up (timeout).
    lose_next_order_response: int = 0
    lost_response_mode: LostResponseMode = "close"
    hang_s: float = 30.0
    # Added to the server clock (``/api/v3/time`` and the recvWindow check): -1021 until a client resyncs.
    clock_skew_ms: int = 0
    # Drop every WebSocket connection each N seconds (None: never).
    drop_websockets_every_s: float | None = None

    def update(self, values: dict[str, Any]) -> None:
        """Set fields from a JSON object; unknown names raise ``KeyError``, bad types ``TypeError``."""
        known = {f.name: f for f in fields(self)}
        for key, value in values.items():
            if key not in known:
                raise KeyError(key)
            current = getattr(self, key)
            if key == "lost_response_mode":
                if value not in ("close", "hang"):
                    raise TypeError("lost_response_mode must be 'close' or 'hang'")
            elif key == "drop_websockets_every_s":
                if value is not None and not isinstance(value, int | float):
                    raise TypeError(f"{key} must be a number or null")
            elif isinstance(current, bool) or not isinstance(value, int | float) or isinstance(value, bool):
                raise TypeError(f"{key} must be a number")
            if isinstance(current, int) and not isinstance(current, bool) and key != "drop_websockets_every_s":
                value = int(value)
            setattr(self, key, value)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)

    # --- consumed by the server ---------------------------------------------------------------

    def take(self, counter: str) -> bool:
        """Consume one unit of ``counter`` if any is left."""
        left = int(getattr(self, counter))
        if left > 0:
            setattr(self, counter, left - 1)
            return True
        return False
