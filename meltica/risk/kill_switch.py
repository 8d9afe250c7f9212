"""The kill switch: ``off`` | ``halt`` | ``reduce_only``, per scope, persisted, every change recorded.

Scopes: ``global``, ``account:<name>``, ``strategy:<name>``. An intent is governed by the strictest
mode among the global scope, its account's and its strategy's (halt > reduce_only > off).

* ``halt`` — no new order of any kind; listeners (the OMS) cancel the open orders of the scope.
* ``reduce_only`` — only intents that reduce the current position pass.

Every change is written through the store (current state in ``kill_switch_state`` and one row in the
append-only ``risk_events``) *before* listeners hear of it, so a restart never forgets a halt.
Releasing is an explicit action with an actor and a reason, like engaging.

Fail closed: a change that tightens a scope (off → reduce_only → halt) holds in this process even when
the store cannot be written (a database blip). It is logged as an error, listeners hear of it, and
the write is retried (``retry_unsaved``, also before every change and refresh) until it is stored;
``unsaved`` lists what is still waiting. A change that loosens a scope is refused when it cannot be
stored: the error is raised and nothing changes.
"""

from __future__ import annotations

import getpass
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol

from meltica.errors import InfrastructureUnavailableError

log = logging.getLogger(__name__)
# The log line of every change (a command that prints the change itself filters it out: see `meltica kill`).
CHANGE_LOG_FORMAT = "kill switch %s: %s → %s (%s, by %s)"

GLOBAL = "global"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def system_clock() -> datetime:
    """Wall-clock time, aware UTC (the default clock outside backtests)."""
    return datetime.now(UTC)


def default_actor() -> str:
    """The OS user, the actor of a change made by hand when none is given."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no passwd entry (containers)
        return "unknown"


class KillSwitchMode(StrEnum):
    OFF = "off"
    HALT = "halt"
    REDUCE_ONLY = "reduce_only"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]

    @classmethod
    def parse(cls, value: str | KillSwitchMode) -> KillSwitchMode:
        """Also accepts the CLI spelling ``reduce-only``."""
        if isinstance(value, KillSwitchMode):
            return value
        try:
            return cls(value.strip().lower().replace("-", "_"))
        except ValueError:
            raise ValueError(f"unknown kill-switch mode {value!r}; use off, halt or reduce_only") from None


_SEVERITY = {KillSwitchMode.OFF: 0, KillSwitchMode.REDUCE_ONLY: 1, KillSwitchMode.HALT: 2}


def scope_name(kind: str, name: str | None = None) -> str:
    """``scope_name("account", "main")`` → ``"account:main"``; ``scope_name("global")`` → ``"global"``."""
    if kind == GLOBAL:
        return GLOBAL
    if kind not in ("account", "strategy") or not name:
        raise ValueError(f"a kill-switch scope is global, account:<name> or strategy:<name>, not {kind}:{name}")
    return f"{kind}:{name}"


def validate_scope(scope: str) -> str:
    kind, _, name = scope.partition(":")
    return scope_name(kind, name or None)


@dataclass(frozen=True, slots=True)
class KillSwitchState:
    mode: KillSwitchMode = KillSwitchMode.OFF
    reason: str | None = None
    actor: str | None = None
    since: datetime = _EPOCH

    @property
    def engaged(self) -> bool:
        return self.mode is not KillSwitchMode.OFF


@dataclass(frozen=True, slots=True)
class KillSwitchChange:
    """What listeners receive: the scope and its state before and after."""

    scope: str
    previous: KillSwitchState
    current: KillSwitchState
    details: Mapping[str, object] = field(default_factory=dict)


class KillSwitchStorage(Protocol):
    """Where the kill switch keeps its state: ``KillSwitchStore`` (SQL) or ``InMemoryKillSwitchStore``."""

    def load(self) -> dict[str, KillSwitchState]: ...

    def save(self, change: KillSwitchChange) -> None:
        """Persist the new state of ``change.scope`` and append the change to the event log, atomically."""
        ...


class InMemoryKillSwitchStore:
    """For backtests and unit tests: state and the change log in memory."""

    def __init__(self) -> None:
        self.states: dict[str, KillSwitchState] = {}
        self.changes: list[KillSwitchChange] = []

    def load(self) -> dict[str, KillSwitchState]:
        return dict(self.states)

    def save(self, change: KillSwitchChange) -> None:
        self.states[change.scope] = change.current
        self.changes.append(change)


Listener = Callable[[KillSwitchChange], None]


class KillSwitch:
    """The kill switch of one process, backed by ``store`` (state loaded on construction)."""

    def __init__(self, store: KillSwitchStorage | None = None, *, clock: Callable[[], datetime] = system_clock) -> None:
        self._store: KillSwitchStorage = store if store is not None else InMemoryKillSwitchStore()
        self._clock = clock
        self._states: dict[str, KillSwitchState] = {}
        # Scopes not off, with their mode: the hot path only looks here, and it is usually empty.
        self.active: dict[str, KillSwitchMode] = {}
        self._listeners: list[Listener] = []
        # Tightening changes that hold in memory but could not be stored yet, oldest first.
        self.unsaved: list[KillSwitchChange] = []
        self._apply_loaded(self._store.load())

    # --- reading -------------------------------------------------------------------------------

    @property
    def state(self) -> KillSwitchState:
        """The global scope's state."""
        return self._states.get(GLOBAL, KillSwitchState())

    def state_of(self, scope: str = GLOBAL) -> KillSwitchState:
        return self._states.get(validate_scope(scope), KillSwitchState())

    def states(self) -> dict[str, KillSwitchState]:
        """Every scope that was ever set (including ones now off)."""
        return dict(self._states)

    @property
    def mode(self) -> KillSwitchMode:
        return self.state.mode

    def effective(self, account: str, strategy: str) -> tuple[KillSwitchMode, str]:
        """The strictest mode over global, ``account:<account>`` and ``strategy:<strategy>``, and its scope."""
        active = self.active
        if not active:
            return KillSwitchMode.OFF, GLOBAL
        best, where = KillSwitchMode.OFF, GLOBAL
        for scope in (GLOBAL, "account:" + account, "strategy:" + strategy):
            mode = active.get(scope)
            if mode is not None and mode.severity > best.severity:
                best, where = mode, scope
        return best, where

    # --- changing ------------------------------------------------------------------------------

    def engage(
        self,
        mode: KillSwitchMode | str,
        reason: str,
        actor: str | None = None,
        *,
        scope: str = GLOBAL,
        details: Mapping[str, object] | None = None,
    ) -> KillSwitchState:
        """Switch ``scope`` to ``mode`` (halt or reduce_only). A repeat of the current mode changes nothing."""
        target = KillSwitchMode.parse(mode)
        if target is KillSwitchMode.OFF:
            raise ValueError("engage() takes halt or reduce_only; use release() to turn the kill switch off")
        return self._change(validate_scope(scope), target, reason, actor, details)

    def release(
        self,
        actor: str | None = None,
        reason: str = "released",
        *,
        scope: str = GLOBAL,
        details: Mapping[str, object] | None = None,
    ) -> KillSwitchState:
        """Turn ``scope`` off: an explicit, recorded action."""
        return self._change(validate_scope(scope), KillSwitchMode.OFF, reason, actor, details)

    def subscribe(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(change)`` after every persisted change; returns an unsubscribe function.

        Called synchronously: an async listener (the OMS) schedules its work (``loop.create_task``).
        A failing listener is logged as critical, the others still hear the change, and its failure is then
        raised to the caller (the change stands).
        """
        self._listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return unsubscribe

    def refresh(self) -> list[KillSwitchChange]:
        """Reload from the store (another process — ``meltica kill`` — may have changed it) and notify
        listeners of every scope whose mode changed. A scope with a change not yet stored keeps the
        state of this process."""
        self.retry_unsaved()
        loaded = {s: st for s, st in self._store.load().items() if not any(c.scope == s for c in self.unsaved)}
        changes = []
        for scope, current in loaded.items():
            previous = self._states.get(scope, KillSwitchState())
            if previous.mode is not current.mode:
                changes.append(KillSwitchChange(scope, previous, current, {"source": "refresh"}))
        self._apply_loaded(loaded)
        for change in changes:
            self._notify(change)
        return changes

    def retry_unsaved(self) -> int:
        """Store the tightening changes that could not be stored when they were made, oldest first;
        returns how many are still waiting (the first failure stops the round: order matters)."""
        while self.unsaved:
            change = self.unsaved[0]
            try:
                self._store.save(change)
            except Exception as exc:
                # Fail closed: the change already holds in this process (a halt stays engaged); only its
                # record is late. It stays queued, in order, and is retried by the next call.
                log.critical("kill switch %s: %s still not stored (%s): holding it, retrying", change.scope,
                             change.current.mode, exc)  # fmt: skip
                return len(self.unsaved)
            self.unsaved.pop(0)
            log.warning("kill switch %s: %s stored after a failed write", change.scope, change.current.mode)
        return 0

    # --- internals -----------------------------------------------------------------------------

    def _change(
        self,
        scope: str,
        mode: KillSwitchMode,
        reason: str,
        actor: str | None,
        details: Mapping[str, object] | None,
    ) -> KillSwitchState:
        if not reason or not reason.strip():
            raise ValueError("a kill-switch change needs a reason")
        previous = self._states.get(scope, KillSwitchState())
        if previous.mode is mode:
            return previous
        current = KillSwitchState(mode=mode, reason=reason, actor=actor or default_actor(), since=self._clock())
        change = KillSwitchChange(scope, previous, current, dict(details or {}))
        tightening = mode.severity > previous.mode.severity
        if self.retry_unsaved():
            if not tightening:
                raise InfrastructureUnavailableError(
                    f"kill switch {scope}: earlier changes are not stored yet; refusing to loosen it to {mode}"
                )
            # Queued behind the changes not stored yet: the store sees them in the order they were made.
            self.unsaved.append(change)
            log.error("kill switch %s: %s holds in this process; stored after the earlier changes", scope, mode)
        else:
            try:
                self._store.save(change)  # persisted first: a crash after this line still remembers
            except Exception:
                if not tightening:
                    raise  # loosening: refused when it cannot be recorded
                # Tightening: hold it here anyway (fail closed) and keep retrying the write.
                self.unsaved.append(change)
                log.exception(
                    "kill switch %s: %s could NOT be stored; it holds in this process and the write is retried",
                    scope,
                    mode,
                )
        self._set(scope, current)
        log.warning(CHANGE_LOG_FORMAT, scope, previous.mode, mode, reason, current.actor)
        self._notify(change)
        return current

    def _apply_loaded(self, loaded: Mapping[str, KillSwitchState]) -> None:
        for scope, state in loaded.items():
            self._set(scope, state)

    def restore(self, scope: str, state: KillSwitchState) -> None:
        """Take ``state`` as the scope's durable state without telling any listener (nothing changed:
        a restart reading what was persisted or snapshotted)."""
        self._set(scope, state)

    def _set(self, scope: str, state: KillSwitchState) -> None:
        self._states[scope] = state
        if state.mode is KillSwitchMode.OFF:
            self.active.pop(scope, None)
        else:
            self.active[scope] = state.mode

    def _notify(self, change: KillSwitchChange) -> None:
        """Every listener hears the change even when one fails (a listener's bug must not keep the halt
        from the others); the change stands, and the first failure is then raised to the caller."""
        failures: list[Exception] = []
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception as exc:
                log.critical("kill-switch listener %r failed on %s → %s", listener, change.scope, change.current.mode)
                failures.append(exc)
        if failures:
            raise failures[0]
