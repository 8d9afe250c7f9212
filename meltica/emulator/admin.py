"""The admin endpoints (``/_emulator/...``): fault knobs, replay control, state, deposits, fees, the driven
market (lock-step paper runs; ``server`` module docstring) and the execution journal. Every request carries
the emulator's admin token (``admin_refusal``)."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from meltica.emulator.config import ADMIN_TOKEN_HEADER
from meltica.emulator.core import EmulatorCore, MarketTimeConflictError
from meltica.emulator.market import plain
from meltica.emulator.replay import BarEvent
from meltica.matching import FeeSchedule


def admin_refusal(request: web.Request, admin_token: str) -> web.Response | None:
    """Why an admin request is refused (``None``: it may run). Nothing is read or applied before this.

    The token header also stops cross-site requests: a browser sends a custom header only after a CORS
    preflight, which the emulator never grants. A POST must be JSON (a form or ``text/plain`` body is
    what a page can send without a preflight)."""
    given = request.headers.get(ADMIN_TOKEN_HEADER)
    if not given:
        return admin_error(401, "admin_token_missing", f"the {ADMIN_TOKEN_HEADER} header is required")
    if not hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), admin_token.encode("utf-8", "surrogateescape")
    ):
        return admin_error(403, "admin_token_invalid", f"the {ADMIN_TOKEN_HEADER} header is not this emulator's")
    if request.method not in ("GET", "HEAD", "OPTIONS") and request.content_type != "application/json":
        return admin_error(
            415, "admin_body_not_json", "admin requests send a JSON body (Content-Type: application/json)"
        )
    return None


class AdminEndpoints:
    """The ``/_emulator/...`` endpoints of one emulator (the admin token is checked before any of them runs)."""

    def __init__(self, emu: EmulatorCore) -> None:
        self.emu = emu

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/_emulator/faults", self.get_faults)
        router.add_post("/_emulator/faults", self.set_faults)
        router.add_post("/_emulator/step", self.step)
        router.add_get("/_emulator/state", self.state)
        router.add_post("/_emulator/deposit", self.deposit)
        router.add_post("/_emulator/fees", self.fees)
        router.add_post("/_emulator/market/open", self.market_open)
        router.add_post("/_emulator/market/bar", self.market_bar)
        router.add_get("/_emulator/executions", self.executions)

    async def get_faults(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.emu.faults.as_dict())

    async def set_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise TypeError("expected a JSON object")
            drop = bool(body.pop("drop_websockets", False))
            if body.pop("reset", False):
                self.emu.faults.reset()
            self.emu.faults.update(body)
        except (ValueError, TypeError, KeyError) as exc:
            return web.json_response({"error": f"bad fault settings: {exc}"}, status=400)
        dropped = await self.emu.hub.drop_all() if drop else 0
        return web.json_response({**self.emu.faults.as_dict(), "dropped": dropped})

    async def step(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else {}
        n = int(body.get("n", 1)) if isinstance(body, dict) else 1
        done = await self.emu.step(n)
        return web.json_response({"applied": done, "events_left": self.emu.events_left})

    async def state(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "market_time": self.emu.market_now().isoformat(),
                "server_time_ms": self.emu.server_ms(),
                "events_total": len(self.emu.events),
                "events_left": self.emu.events_left,
                "connections": len(self.emu.hub.connections),
                "symbols": list(self.emu.specs),
                "accounts": list(self.emu.accounts),
                "market_time_ms": self.emu.market_ms(),
                "driven": self.emu.driven,
                "realtime": self.emu.config.realtime,
                "speed": self.emu.config.speed,
                "last_execution_seq": self.emu.publisher.last_execution_seq,
                "user_subscriptions": self.emu.user_subscriptions(),
            }
        )

    async def deposit(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            self.emu.deposit(str(body["account"]), str(body["asset"]).upper(), Decimal(str(body["amount"])))
        except (ValueError, TypeError, KeyError, InvalidOperation) as exc:
            return web.json_response({"error": f"bad deposit: {exc}"}, status=400)
        return web.json_response({"ok": True})

    # --- admin: a driven market (lock-step paper runs; module docstring) -----------------------------

    async def fees(self, request: web.Request) -> web.StreamResponse:
        """``{account, maker, taker, quote_commission?}``: the account's fee schedule from now on."""
        try:
            body = await json_object(request)
            account = str(body["account"])
            if account not in self.emu.accounts:
                raise KeyError(f"unknown account {account!r}")
            fees = FeeSchedule(
                maker=body_decimal(body, "maker"),
                taker=body_decimal(body, "taker"),
                quote_commission=bool(body.get("quote_commission", False)),
            )
        except (ValueError, TypeError, KeyError, InvalidOperation) as exc:
            return web.json_response({"error": f"bad fees: {exc}"}, status=400)
        self.emu.engine.set_fees(account, fees)
        return web.json_response(
            {
                "account": account,
                "maker": plain(fees.maker),
                "taker": plain(fees.taker),
                "quote_commission": fees.quote_commission,
            }
        )

    def _driven_symbol(self, body: Mapping[str, Any]) -> str:
        symbol = str(body["symbol"]).replace("/", "").upper()
        if symbol not in self.emu.specs:
            raise KeyError(f"unknown symbol {body['symbol']!r}")
        return symbol

    def _driven_answer(self, after: int) -> web.Response:
        return web.json_response(
            {
                "market_time_ms": self.emu.market_ms(),
                "last_execution_seq": self.emu.publisher.last_execution_seq,
                "executions": {name: self.emu.publisher.executions(name, after) for name in self.emu.accounts},
            }
        )

    async def market_open(self, request: web.Request) -> web.StreamResponse:
        """``{symbol, ts_ms, price, volume?}``: market time := the bar's open, the open printed
        (``on_trade(symbol, price, 0)``, as the backtester prints it). With ``volume`` and a fill model
        with ``bar_volume_share``, the synthetic book holds that share of the bar's volume (as there)."""
        try:
            body = await json_object(request)
            symbol = self._driven_symbol(body)
            price = body_decimal(body, "price")
            volume = None if body.get("volume") is None else body_decimal(body, "volume")
            ts_ms = int(body["ts_ms"])
        except (ValueError, TypeError, KeyError, InvalidOperation) as exc:
            return web.json_response({"error": f"bad market open: {exc}"}, status=400)
        after = self.emu.publisher.last_execution_seq
        try:
            self.emu.drive_to(ts_ms)
        except MarketTimeConflictError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        self.emu.bar_step.open(symbol, price, volume)
        self.emu.publisher.sync_book(symbol)
        await asyncio.sleep(0)  # let the stream writers run
        return self._driven_answer(after)

    async def market_bar(self, request: web.Request) -> web.StreamResponse:
        """``{symbol, open_time_ms, close_time_ms, open, high, low, close, volume}``: market time := the
        close, the bar's path run (``on_bar``: fills stamped with the close), GTD orders expired, the
        kline stored and published."""
        try:
            body = await json_object(request)
            symbol = self._driven_symbol(body)
            o, h, lo, c = (body_decimal(body, k) for k in ("open", "high", "low", "close"))
            volume = body_decimal(body, "volume")
            open_ms, close_ms = int(body["open_time_ms"]), int(body["close_time_ms"])
            if close_ms <= open_ms:
                raise ValueError("close_time_ms must be after open_time_ms")
        except (ValueError, TypeError, KeyError, InvalidOperation) as exc:
            return web.json_response({"error": f"bad market bar: {exc}"}, status=400)
        after = self.emu.publisher.last_execution_seq
        try:
            self.emu.drive_to(close_ms)
        except MarketTimeConflictError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        open_time = datetime.fromtimestamp(open_ms / 1000, UTC)
        interval_s = (close_ms - open_ms) // 1000
        self.emu.print_bar(BarEvent(self.emu.market_now(), symbol, open_time, o, h, lo, c, volume, interval_s))
        self.emu.bar_step.path(symbol, o, h, lo, c, volume)
        self.emu.bar_step.expire()
        self.emu.publisher.klines(symbol)
        self.emu.publisher.sync_book(symbol)
        await asyncio.sleep(0)
        return self._driven_answer(after)

    async def executions(self, request: web.Request) -> web.StreamResponse:
        """``?account=A&after=SEQ``: the account's executions after ``SEQ`` (every account without one)."""
        try:
            after = int(request.query.get("after", "0"))
        except ValueError:
            return web.json_response({"error": "after must be an integer"}, status=400)
        account = request.query.get("account")
        if account is not None and account not in self.emu.accounts:
            return web.json_response({"error": f"unknown account {account!r}"}, status=400)
        names = [account] if account is not None else list(self.emu.accounts)
        return web.json_response(
            {
                "market_time_ms": self.emu.market_ms(),
                "last_execution_seq": self.emu.publisher.last_execution_seq,
                "executions": {name: self.emu.publisher.executions(name, after) for name in names},
            }
        )


# --- helpers ---------------------------------------------------------------------------------------------


async def json_object(request: web.Request) -> dict[str, Any]:
    body = await request.json()
    if not isinstance(body, dict):
        raise TypeError("expected a JSON object")
    return body


def body_decimal(body: Mapping[str, Any], name: str) -> Decimal:
    value = Decimal(str(body[name]))
    if not value.is_finite():
        raise ValueError(f"{name} must be a finite number")
    return value


def admin_error(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"error": message, "reason": reason}, status=status)
