"""Execution: the order management system (``OrderManager``), its store and recovery.

The contract with portfolio, risk and the local order emulator is ``README.md`` in this package.
"""

from meltica.execution.oms import (
    CRASH_POINT_ENV,
    Anomaly,
    OrderManager,
    crash_point,
    needs_emulation,
)
from meltica.execution.recovery import RecoveredOrder, RecoveryReport
from meltica.execution.store import NEVER_REACHED_VENUE, MemoryOrderStore, OrderStore, OrderStoreProtocol
from meltica.retry import RetryPolicy

__all__ = [
    "CRASH_POINT_ENV",
    "NEVER_REACHED_VENUE",
    "Anomaly",
    "MemoryOrderStore",
    "OrderManager",
    "OrderStore",
    "OrderStoreProtocol",
    "RecoveredOrder",
    "RecoveryReport",
    "RetryPolicy",
    "crash_point",
    "needs_emulation",
]
