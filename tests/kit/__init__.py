"""What many tests build, built in one place: a hand-set clock, spot instruments, logged child
processes, the risk path's stores with a database outage, and common order intents.

``from tests.kit import ManualClock, spot_instrument, LoggedProcess``. A test module that needs a variant
passes parameters instead of defining its own copy (tests/unit/test_kit.py checks no module does).
"""

from tests.kit.clock import ManualClock
from tests.kit.instruments import spot_instrument
from tests.kit.orders import trailing_stop_intent
from tests.kit.outages import OutageKillSwitchStore, OutageRecorder
from tests.kit.processes import LoggedProcess, child_environment

__all__ = [
    "LoggedProcess",
    "ManualClock",
    "OutageKillSwitchStore",
    "OutageRecorder",
    "child_environment",
    "spot_instrument",
    "trailing_stop_intent",
]
