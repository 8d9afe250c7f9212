"""Risk: the pre-trade gate every order intent passes, post-trade breakers and the kill switch.

See ``meltica/execution/README.md`` for how it fits with the portfolio and the OMS, and
``meltica.risk.engine`` for the list of checks.
"""

from meltica.domain.risk import RiskDecision
from meltica.risk.engine import Breach, PortfolioView, RiskEngine
from meltica.risk.kill_switch import (
    GLOBAL,
    InMemoryKillSwitchStore,
    KillSwitch,
    KillSwitchChange,
    KillSwitchMode,
    KillSwitchState,
    KillSwitchStorage,
    default_actor,
    scope_name,
    system_clock,
)
from meltica.risk.limits import Limit, ResolvedLimits, RiskConfig, resolve_limits
from meltica.risk.store import (
    DecisionSink,
    InMemoryRecorder,
    InMemoryRiskStateStore,
    KillSwitchStore,
    RiskRecorder,
    RiskStateStorage,
    RiskStateStore,
)

__all__ = [
    "GLOBAL",
    "Breach",
    "DecisionSink",
    "InMemoryKillSwitchStore",
    "InMemoryRecorder",
    "InMemoryRiskStateStore",
    "KillSwitch",
    "KillSwitchChange",
    "KillSwitchMode",
    "KillSwitchState",
    "KillSwitchStorage",
    "KillSwitchStore",
    "Limit",
    "PortfolioView",
    "ResolvedLimits",
    "RiskConfig",
    "RiskDecision",
    "RiskEngine",
    "RiskRecorder",
    "RiskStateStorage",
    "RiskStateStore",
    "default_actor",
    "resolve_limits",
    "scope_name",
    "system_clock",
]
