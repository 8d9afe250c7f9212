"""The live execution stage as a ``python -m streams.worker`` factory, for ``test_live_driver_worker.py``.

``live_exec_factory:factory`` → one ``ExecutionService`` (live) with a ``LiveDriver`` over the ccxt
adapter pointed at the emulator, and the PostgreSQL ``OrderStore`` (write-ahead, recovery on start).
Worker params: ``db_url``, ``emulator_url``, ``api_key``, ``secret``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from live_exec_process import ACCOUNT, config

from meltica.adapters.ccxt import RetryPolicy
from meltica.adapters.registry import create_adapter
from meltica.emulator import CCXT_OPTIONS, ccxt_urls_for
from meltica.execution import OrderStore
from meltica.live.execution import ExecutionService
from meltica.live.live_driver import LiveDriver
from meltica.storage.engine import make_engine


def factory(worker_config: Mapping[str, Any]) -> list[ExecutionService]:
    params = dict(worker_config.get("params") or {})
    adapter = create_adapter(
        "binance",
        account=ACCOUNT,
        credentials={"apiKey": params["api_key"], "secret": params["secret"]},
        urls={"api": ccxt_urls_for(params["emulator_url"])},
        options=dict(CCXT_OPTIONS),
        retry=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05),
    )
    driver = LiveDriver(adapter, account=ACCOUNT, poll_interval=0.2, stale_after=1.0)
    return [ExecutionService(config(), {ACCOUNT: driver}, store=OrderStore(make_engine(params["db_url"])))]
