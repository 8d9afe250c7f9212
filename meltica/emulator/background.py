"""An emulator serving from its own thread and event loop, for synchronous code and subprocess tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from meltica.emulator.config import EmulatorConfig
from meltica.emulator.server import EmulatorServer

T = TypeVar("T")


class EmulatorThread:
    """``with EmulatorThread(config) as emu:`` — an :class:`EmulatorServer` running on a daemon thread.

    ``emu.rest_url`` / ``emu.ws_url`` / ``emu.ccxt_urls()`` / ``emu.admin_token`` / ``emu.admin_headers()`` as
    on the server; ``emu.call(coro)`` runs a coroutine on the emulator's loop (``emu.call(emu.server.step(5))``)
    and returns its result.
    """

    def __init__(self, config: EmulatorConfig, *, start_timeout: float = 60.0) -> None:
        self.server = EmulatorServer(config)
        self._timeout = start_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="meltica-emulator", daemon=True)

    def start(self) -> EmulatorThread:
        self._thread.start()
        self.call(self.server.start())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.call(self.server.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=self._timeout)

    @property
    def rest_url(self) -> str:
        return self.server.rest_url

    @property
    def ws_url(self) -> str:
        return self.server.ws_url

    def ccxt_urls(self) -> dict[str, Any]:
        return self.server.ccxt_urls()

    @property
    def admin_token(self) -> str:
        return self.server.admin_token

    def admin_headers(self) -> dict[str, str]:
        return self.server.admin_headers()

    def __enter__(self) -> EmulatorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
