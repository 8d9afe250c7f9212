"""Which path a worker's outputs take to the broker (no broker needed: the app is built, not started)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from meltica.live.processor import Emit, Incoming, Outgoing
from meltica.messaging import Catalogue
from streams.worker import build_worker_app, runtime_of


class _Echo:
    name = "echo"
    inputs: tuple[str, ...] = ("md.trades",)

    async def start(self, emit: Emit) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def handle(self, message: Incoming) -> Sequence[Outgoing]:
        return []

    def snapshot(self, key: str) -> dict[str, Any] | None:
        return None

    def restore(self, key: str, state: Mapping[str, Any]) -> None:
        return None


@pytest.mark.parametrize(("guarantee", "direct"), [(None, True), ("at_least_once", True), ("exactly_once", False)])
def test_outputs_bypass_topic_send_only_without_faust_transactions(guarantee: str | None, direct: bool) -> None:
    # Outputs go to Faust's producer directly (cheaper), except under exactly-once: only Topic.send picks the
    # transactional producer, and a direct send would leave the output outside the transaction.
    settings = {} if guarantee is None else {"processing_guarantee": guarantee}
    app = build_worker_app(
        f"sends-{guarantee}", "127.0.0.1:9", [_Echo()], Catalogue(prefix="sends."), stall_deadline=0, **settings
    )
    assert runtime_of(app).direct_send is direct
