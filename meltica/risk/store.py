"""Risk persistence: decisions and breaches (``risk_events``, append-only), kill-switch state
(``kill_switch_state``) and small durable state such as the equity peak (``risk_state``)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Engine, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from meltica.risk.kill_switch import KillSwitchChange, KillSwitchMode, KillSwitchState
from meltica.storage.tables import kill_switch_state, risk_events, risk_state

if TYPE_CHECKING:
    from meltica.domain.risk import RiskDecision
    from meltica.risk.engine import Breach


def to_json(value: object) -> Any:
    """Plain JSON data: Decimals as strings (exact), datetimes ISO 8601, enums by value."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_json(v) for v in value]
    return value


_DECISION_NAMESPACE = uuid.UUID("0f6d8f0e-2b7c-5a41-9c55-52a1d7f3b6e9")


def decision_event_id(decision: RiskDecision | Breach) -> uuid.UUID:
    """The ``risk_events`` key of a decision or breach: a UUID5 of its canonical JSON (every field, Decimals
    as strings, times in ISO 8601). The same decision always gets the same id — recorded again after a
    failed write, redelivered, or written both by ``RiskRecorder`` and by the ``risk.decisions`` sink
    (``meltica.live.sinks``) — so it is stored once."""
    row = decision.as_row()
    if row["decision"] in ("approved", "rejected"):
        # The decision's own fields (what the sink's RiskDecisionMessage carries), not the row layout.
        details = dict(row["details"])
        exchange = details.pop("exchange", None)
        fields = {
            "intent_id": row["intent_id"],
            "approved": row["decision"] == "approved",
            "rule": row["rule"],
            "reason": row["reason"],
            "ts": row["ts"],
            "details": details,
            "account": row["account"],
            "strategy": row["strategy"],
            "exchange": exchange,
            "symbol": row["symbol"],
        }
    else:
        fields = row
    canonical = json.dumps(to_json(fields), sort_keys=True, separators=(",", ":"))
    return uuid.uuid5(_DECISION_NAMESPACE, canonical)


# --- kill switch ---------------------------------------------------------------------------------


class KillSwitchStore:
    """``kill_switch_state`` (one row per scope) plus a ``kill_switch_on``/``kill_switch_off`` row in
    ``risk_events`` for every change, in one transaction."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def load(self) -> dict[str, KillSwitchState]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(kill_switch_state)).mappings().all()
        return {
            row["scope"]: KillSwitchState(
                mode=KillSwitchMode(row["mode"]), reason=row["reason"], actor=row["actor"], since=row["changed_at"]
            )
            for row in rows
        }

    def save(self, change: KillSwitchChange) -> None:
        state = change.current
        values = {"mode": state.mode.value, "reason": state.reason, "actor": state.actor, "changed_at": state.since}
        upsert = pg_insert(kill_switch_state).values(scope=change.scope, **values)
        upsert = upsert.on_conflict_do_update(index_elements=[kill_switch_state.c.scope], set_=values)
        account = change.scope.split(":", 1)[1] if change.scope.startswith("account:") else None
        strategy = change.scope.split(":", 1)[1] if change.scope.startswith("strategy:") else None
        event = {
            "event_id": uuid.uuid4(),
            "ts": state.since,
            "account": account,
            "strategy": strategy,
            "symbol": None,
            "intent_id": None,
            "decision": "kill_switch_off" if state.mode is KillSwitchMode.OFF else "kill_switch_on",
            "rule": "kill_switch",
            "reason": state.reason,
            "details": to_json(
                {
                    "scope": change.scope,
                    "mode": state.mode,
                    "previous_mode": change.previous.mode,
                    **change.details,
                }
            ),
            "actor": state.actor,
        }
        with self._engine.begin() as conn:
            conn.execute(upsert)
            conn.execute(insert(risk_events).values(**event))


# --- decisions -----------------------------------------------------------------------------------


class DecisionSink(Protocol):
    """What the engine records to: ``RiskRecorder`` or anything with the same two methods."""

    def record(self, decision: RiskDecision) -> None: ...

    def record_breach(self, breach: Breach) -> None: ...


class RiskRecorder:
    """Appends decisions and breaches to ``risk_events``, each under :func:`decision_event_id`: a row
    already there (a retry, or the ``risk.decisions`` sink's copy) is not written again.

    Rows are buffered and written in one multi-row insert when ``batch_size`` is reached, on
    ``flush()`` and on ``close()``; ``batch_size=1`` writes every decision immediately. Thread-safe.
    Breaches are written at once: they are rare and they matter.
    """

    def __init__(self, engine: Engine, *, batch_size: int = 256) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self._engine = engine
        self._batch_size = batch_size
        self._pending: list[RiskDecision | Breach] = []
        self._lock = threading.Lock()
        self.written = 0

    def record(self, decision: RiskDecision) -> None:
        with self._lock:
            self._pending.append(decision)
            full = len(self._pending) >= self._batch_size
        if full:
            self.flush()

    def record_breach(self, breach: Breach) -> None:
        with self._lock:
            self._pending.append(breach)
        self.flush()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> int:
        """Write everything buffered; returns the number of rows written."""
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return 0
        rows = [item.as_row() for item in batch]
        for item, row in zip(batch, rows, strict=True):
            row["event_id"] = decision_event_id(item)
            row["details"] = to_json(row["details"])
        stmt = (
            pg_insert(risk_events)
            .values(rows)
            .on_conflict_do_nothing(index_elements=[risk_events.c.event_id])
            .returning(risk_events.c.event_id)  # the rows actually new
        )
        try:
            with self._engine.begin() as conn:
                written = len(conn.execute(stmt).all())
        except Exception:
            with self._lock:  # keep them: a later flush retries, nothing is silently lost
                self._pending[:0] = batch
            raise
        self.written += written
        return written

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> RiskRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InMemoryRecorder:
    """Keeps decisions and breaches in lists (backtests, tests)."""

    def __init__(self) -> None:
        self.decisions: list[RiskDecision] = []
        self.breaches: list[Breach] = []

    def record(self, decision: RiskDecision) -> None:
        self.decisions.append(decision)

    def record_breach(self, breach: Breach) -> None:
        self.breaches.append(breach)


# --- small durable state -------------------------------------------------------------------------


class RiskStateStorage(Protocol):
    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, key: str, value: Mapping[str, Any], ts: datetime) -> None: ...


class InMemoryRiskStateStore:
    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {}

    def get(self, key: str) -> dict[str, Any] | None:
        value = self.values.get(key)
        return None if value is None else dict(value)

    def put(self, key: str, value: Mapping[str, Any], ts: datetime) -> None:
        self.values[key] = dict(to_json(value))


class RiskStateStore:
    """``risk_state``: key → JSON (equity peak per account, daily PnL anchors), upserted."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def get(self, key: str) -> dict[str, Any] | None:
        with self._engine.connect() as conn:
            value = conn.execute(select(risk_state.c.value).where(risk_state.c.key == key)).scalar_one_or_none()
        return None if value is None else dict(value)

    def put(self, key: str, value: Mapping[str, Any], ts: datetime) -> None:
        data = to_json(value)
        stmt = pg_insert(risk_state).values(key=key, value=data, updated_at=ts)
        stmt = stmt.on_conflict_do_update(index_elements=[risk_state.c.key], set_={"value": data, "updated_at": ts})
        with self._engine.begin() as conn:
            conn.execute(stmt)
