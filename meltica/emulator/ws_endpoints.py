"""The WebSocket endpoints: market streams (``/ws``, ``/stream``; a listenKey's user data on ``/ws/<key>``),
the WebSocket API (``/ws-api/v3``: user data stream subscription), and the REST ``listenKey`` endpoints."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

from aiohttp import WSMsgType, web

from meltica.emulator import auth, errors
from meltica.emulator.config import EmulatorAccount
from meltica.emulator.core import EmulatorCore
from meltica.emulator.errors import BinanceError
from meltica.emulator.params import Params, Route, required
from meltica.emulator.streams import Connection


class WebSocketEndpoints:
    """Market streams, the user data stream (listenKey and WebSocket API) of one emulator."""

    def __init__(self, emu: EmulatorCore) -> None:
        self.emu = emu
        self.listen_keys: dict[str, str] = {}  # listenKey → account

    def listen_key_routes(self) -> list[Route]:
        """The REST endpoints of the listenKey user data stream (legacy, still used by some clients)."""
        return [
            ("POST", "/api/v3/userDataStream", self.listen_key_new),
            ("PUT", "/api/v3/userDataStream", self.listen_key_keepalive),
            ("DELETE", "/api/v3/userDataStream", self.listen_key_close),
        ]

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/ws", self.market_streams)
        router.add_get("/ws/{rest:.*}", self.market_streams)
        router.add_get("/stream", self.market_streams)
        router.add_get("/ws-api/v3", self.api)

    # --- listenKey user data stream (legacy, still used by some clients) ----------------------------

    async def listen_key_new(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        for key, name in self.listen_keys.items():
            if name == account.name:
                return {"listenKey": key}
        key = secrets.token_urlsafe(45)[:60]
        self.listen_keys[key] = account.name
        return {"listenKey": key}

    async def listen_key_keepalive(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        self._own_listen_key(params, account)
        return {}

    async def listen_key_close(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        self.listen_keys.pop(self._own_listen_key(params, account))
        return {}

    def _own_listen_key(self, params: Params, account: EmulatorAccount | None) -> str:
        """The request's listenKey if it belongs to the calling account. Another account's key is answered
        as Binance answers it, as if it did not exist (-1125): nothing tells a caller whose it is."""
        assert account is not None
        key = required(params, "listenKey")
        if self.listen_keys.get(key) != account.name:
            raise errors.invalid_listen_key()
        return key

    # --- market streams (and a listenKey's user data on /ws/<key>) -------------------------------------

    async def market_streams(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=20, autoping=True)
        await ws.prepare(request)
        rest = request.match_info.get("rest", "")
        combined = request.path.startswith("/stream")
        conn = Connection(ws=ws, kind="combined" if combined else "raw")
        if combined:
            streams = request.query.get("streams", "")
            conn.streams |= {s for s in streams.split("/") if s}
        elif rest:
            if rest in self.listen_keys:
                conn.kind = "listenkey"
                conn.listen_account = self.listen_keys[rest]
            else:
                conn.streams |= {s for s in rest.split("/") if "@" in s}
        self.emu.hub.add(conn)
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                self._market_request(conn, msg.data)
        finally:
            await self.emu.hub.remove(conn)
        return ws

    def _market_request(self, conn: Connection, text: str) -> None:
        try:
            req = json.loads(text)
        except ValueError:
            conn.send({"error": {"code": 3, "msg": "Invalid JSON: expected value at line 1 column 1"}, "id": None})
            return
        if not isinstance(req, dict):
            conn.send({"error": {"code": 3, "msg": "Invalid JSON: expected an object"}, "id": None})
            return
        method = req.get("method")
        req_id = req.get("id")
        args = req.get("params") or []
        if method == "SUBSCRIBE" or method == "UNSUBSCRIBE":
            if not isinstance(args, list) or not all(isinstance(s, str) for s in args):
                conn.send({"error": {"code": 2, "msg": "Invalid request: invalid stream"}, "id": req_id})
                return
            if method == "SUBSCRIBE":
                conn.streams |= set(args)
            else:
                conn.streams -= set(args)
            conn.send({"result": None, "id": req_id})
        elif method == "LIST_SUBSCRIPTIONS":
            conn.send({"result": sorted(conn.streams), "id": req_id})
        elif method == "SET_PROPERTY":
            conn.send({"result": None, "id": req_id})
        elif method == "GET_PROPERTY":
            conn.send({"result": conn.kind == "combined", "id": req_id})
        else:
            conn.send({"error": {"code": 2, "msg": f"Invalid request: unknown method {method}"}, "id": req_id})

    # --- WebSocket API (user data stream subscription) ---------------------------------------------

    async def api(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=20, autoping=True)
        await ws.prepare(request)
        conn = Connection(ws=ws, kind="wsapi")
        self.emu.hub.add(conn)
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                if self.emu.faults.latency_ms > 0:
                    await asyncio.sleep(self.emu.faults.latency_ms / 1000)
                self._api_request(conn, msg.data)
        finally:
            await self.emu.hub.remove(conn)
        return ws

    def _api_request(self, conn: Connection, text: str) -> None:
        try:
            req = json.loads(text)
        except ValueError:
            conn.send({"id": None, "status": 400, "error": {"code": -1135, "msg": "Invalid JSON Request"}})
            return
        req_id = req.get("id") if isinstance(req, dict) else None
        try:
            if not isinstance(req, dict):
                raise BinanceError(-1135, "Invalid JSON Request")
            result = self._api_call(conn, str(req.get("method")), req.get("params") or {})
        except BinanceError as exc:
            conn.send({"id": req_id, "status": exc.status, "error": {"code": exc.code, "msg": exc.msg}})
            return
        conn.send({"id": req_id, "status": 200, "result": result, "rateLimits": []})

    def _api_call(self, conn: Connection, method: str, params: Any) -> Any:
        if not isinstance(params, dict):
            raise BinanceError(-1130, "Data sent for parameter 'params' is not valid.")
        if method == "ping":
            return {}
        if method == "time":
            return {"serverTime": self.emu.server_ms()}
        if method == "userDataStream.subscribe.signature":
            account = self.emu.account_for_key(params.get("apiKey"))
            ts = params.get("timestamp")
            recv = params.get("recvWindow")
            auth.check_timing(
                None if ts is None else str(ts), None if recv is None else str(recv), self.emu.server_ms()
            )
            auth.check_signature(auth.ws_payload(params), params.get("signature"), account.api_secret)
            if account.name in conn.user_subscriptions.values():
                raise BinanceError(-2035, "User Data Stream subscription already active.")
            sub_id = conn.next_subscription_id
            conn.next_subscription_id += 1
            conn.user_subscriptions[sub_id] = account.name
            return {"subscriptionId": sub_id}
        if method == "userDataStream.unsubscribe":
            sub = params.get("subscriptionId")
            if sub is None:
                conn.user_subscriptions.clear()
            else:
                if int(sub) not in conn.user_subscriptions:
                    raise BinanceError(-2036, "User Data Stream subscription not active.")
                conn.user_subscriptions.pop(int(sub))
            return {}
        if method == "session.subscriptions":
            return [{"subscriptionId": s} for s in sorted(conn.user_subscriptions)]
        raise BinanceError(-1020, "This operation is not supported.")
