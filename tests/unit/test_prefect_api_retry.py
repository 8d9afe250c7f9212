"""PrefectApi against a real local HTTP server: transient answers are sent again, a real error is not."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from meltica.errors import InfrastructureError, InfrastructureUnavailableError
from meltica.infra.prefect import PrefectApi


class _Scripted(ThreadingHTTPServer):
    """Answers each request with the next status of ``script`` (the last one repeats) and counts requests."""

    def __init__(self, script: list[int]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script = script
        self.requests: list[tuple[str, str, bytes]] = []


class _Handler(BaseHTTPRequestHandler):
    server: _Scripted

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.server.requests.append((self.command, self.path, self.rfile.read(length)))
        n = len(self.server.requests) - 1
        status = self.server.script[min(n, len(self.server.script) - 1)]
        body = json.dumps({"id": "run-1"} if status == 200 else {"exception_message": "Service Unavailable"})
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if status == 429:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = _answer  # noqa: N815 - the names http.server dispatches to

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[list[_Scripted]]:
    servers: list[_Scripted] = []
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def _start(servers: list[_Scripted], script: list[int]) -> tuple[_Scripted, PrefectApi]:
    server = _Scripted(script)
    servers.append(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return server, PrefectApi(f"http://{host!s}:{port}/api", retries=3, backoff=0.01)


def test_a_busy_server_is_asked_again_and_the_same_body_is_sent(serve: list[_Scripted]) -> None:
    server, api = _start(serve, [503, 429, 502, 200])
    assert api.call("POST", "/deployments/d/create_flow_run", {"name": "x"}) == {"id": "run-1"}
    assert len(server.requests) == 4
    assert {body for _m, _p, body in server.requests} == {b'{"name": "x"}'}


def test_a_server_busy_past_the_retries_is_unavailable_with_its_answer(serve: list[_Scripted]) -> None:
    server, api = _start(serve, [503])
    with pytest.raises(InfrastructureUnavailableError, match=r"answered 503 4 times .*Service Unavailable"):
        api.call("GET", "/work_pools/x")
    assert len(server.requests) == 4  # the first call and 3 retries


def test_a_server_error_is_not_retried(serve: list[_Scripted]) -> None:
    server, api = _start(serve, [500, 200])
    with pytest.raises(InfrastructureError, match="answered 500") as raised:
        api.call("GET", "/work_pools/x")
    assert not isinstance(raised.value, InfrastructureUnavailableError)
    assert len(server.requests) == 1
