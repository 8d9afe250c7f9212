"""The stream worker's stall watchdog (streams/worker.py ``StallWatchdog``): its thread ends a worker whose
event loop stops turning, and only such a worker. Its progress check awaits the broker (a consumer start, an
end-offsets request); a slow broker answer is a loop that turns, not a blocked one — on a loaded machine the
thread used to take it for one and end a healthy worker ("the event loop has not turned for 5 s").

No broker here: the broker call is an awaited sleep; ``_expire`` records instead of exiting the process."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from streams.worker import StallWatchdog

NOT_TURNED = "the event loop has not turned"


class Recording(StallWatchdog):
    def __init__(self, deadline: float, broker_answers_after: float) -> None:
        runtime: Any = SimpleNamespace(
            progress=0, stopping=False, app=SimpleNamespace(rebalancing=False), stats=SimpleNamespace(key="w")
        )
        super().__init__(runtime, inputs=["in"], deadline=deadline)
        self.broker_answers_after = broker_answers_after
        self.expired: list[str] = []

    def _expire(self, why: str) -> None:
        self.expired.append(why)

    async def _waiting_input(self) -> str:
        await asyncio.sleep(self.broker_answers_after)  # the loop turns meanwhile
        return ""  # nothing waits: not a stall either


async def _run(dog: Recording, before: float, block: float = 0.0, after: float = 0.0) -> None:
    dog.start()
    try:
        await asyncio.sleep(before)
        time.sleep(block)  # a task that blocks the loop (0: none)
        await asyncio.sleep(after)
    finally:
        await dog.stop()


def test_a_slow_broker_answer_is_not_a_loop_that_stopped_turning() -> None:
    dog = Recording(deadline=2, broker_answers_after=5)  # the thread's limit: 2 s + 0.5 s without a turn
    asyncio.run(_run(dog, before=6))
    assert not [why for why in dog.expired if NOT_TURNED in why], dog.expired


def test_a_task_that_blocks_the_loop_ends_the_worker() -> None:
    dog = Recording(deadline=1, broker_answers_after=0)
    asyncio.run(_run(dog, before=0.5, block=3, after=0.5))
    assert any(NOT_TURNED in why for why in dog.expired), dog.expired
