"""The risk engine's answer to one intent: a value object shared by the engine (``meltica.risk``), the
Kafka message schemas (``meltica.messaging``) and the decision sinks, so it lives in the domain layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from meltica.errors import RiskRejectedError

RISK_ACTOR = "risk-engine"
"""Who wrote a risk decision or engaged a kill switch, in the audit rows."""


@dataclass(frozen=True, slots=True)
class RiskDecision:
    """The answer to one intent. ``rule`` names the failed check (``None`` when approved)."""

    intent_id: str
    approved: bool
    rule: str | None
    reason: str | None
    ts: datetime
    details: dict[str, Any] = field(default_factory=dict)
    account: str | None = None
    strategy: str | None = None
    exchange: str | None = None
    symbol: str | None = None

    def raise_if_rejected(self) -> None:
        """``RiskRejectedError`` (terminal) for a rejection; nothing for an approval."""
        if not self.approved:
            raise RiskRejectedError(
                f"intent {self.intent_id} rejected by risk: {self.reason}",
                reason=self.rule or "risk_rejected",
                intent_id=self.intent_id,
                rule=self.rule,
            )

    def as_row(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "account": self.account,
            "strategy": self.strategy,
            "symbol": self.symbol,
            "intent_id": self.intent_id,
            "decision": "approved" if self.approved else "rejected",
            "rule": self.rule,
            "reason": self.reason,
            "details": {"exchange": self.exchange, **self.details},
            "actor": RISK_ACTOR,
        }
