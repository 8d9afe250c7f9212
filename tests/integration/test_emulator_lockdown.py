"""The emulator stays a local test venue: admin token, loopback binding, listenKey ownership, no secret in ps."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import ccxt
import ccxt.async_support as ccxt_async
import pytest

from meltica.emulator import (
    ADMIN_TOKEN_HEADER,
    EmulatorAccount,
    EmulatorConfig,
    EmulatorServer,
    EmulatorThread,
    ccxt_config,
    ccxt_urls_for,
)
from meltica.errors import ConfigurationError

pytestmark = pytest.mark.integration

KEY_A, SECRET_A = "lockdown-key-a", "lockdown-secret-a-0123456789"
KEY_B, SECRET_B = "lockdown-key-b", "lockdown-secret-b-0123456789"


def run(body: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=30))


def two_accounts(**kwargs: Any) -> EmulatorConfig:
    return EmulatorConfig(
        accounts=[EmulatorAccount("alice", KEY_A, SECRET_A), EmulatorAccount("bob", KEY_B, SECRET_B)],
        initial_prices={"BTCUSDT": Decimal(40_000)},
        **kwargs,
    )


# --- admin token -------------------------------------------------------------------------------------


def test_admin_requests_without_the_token_are_refused_and_change_nothing() -> None:
    async def body() -> None:
        async with EmulatorServer(two_accounts()) as emu, aiohttp.ClientSession() as http:
            before_faults = emu.faults.as_dict()
            before_usdt = emu.engine.ledger.balance("alice", "USDT").free
            deposit = {"account": "alice", "asset": "USDT", "amount": "1000"}
            bar = {"symbol": "BTCUSDT", "ts_ms": 1_700_000_000_000, "price": "1"}
            wrong = {ADMIN_TOKEN_HEADER: "not-the-token-0123456789"}
            good = emu.admin_headers()
            attempts: list[tuple[str, str, dict[str, Any], int, str]] = [
                ("/_emulator/deposit", "json", {}, 401, "admin_token_missing"),
                ("/_emulator/deposit", "json", wrong, 403, "admin_token_invalid"),
                ("/_emulator/faults", "json", {}, 401, "admin_token_missing"),
                ("/_emulator/faults", "json", wrong, 403, "admin_token_invalid"),
                ("/_emulator/market/open", "json", wrong, 403, "admin_token_invalid"),
                # what a page on another site can send without a preflight: a text/plain body, no header
                ("/_emulator/deposit", "text", {}, 401, "admin_token_missing"),
                ("/_emulator/faults", "text", {}, 401, "admin_token_missing"),
                # and a text/plain body is refused even with the token
                ("/_emulator/deposit", "text", good, 415, "admin_body_not_json"),
                ("/_emulator/market/open", "text", good, 415, "admin_body_not_json"),
            ]
            for path, kind, headers, status, reason in attempts:
                payload = {"faults": {"fail_next": 5}, "market": bar}.get(path.split("/")[2], deposit)
                if kind == "json":
                    request = http.post(emu.rest_url + path, json=payload, headers=headers)
                else:
                    request = http.post(
                        emu.rest_url + path,
                        data=json.dumps(payload),
                        headers={**headers, "Content-Type": "text/plain;charset=UTF-8"},
                    )
                async with request as r:
                    assert (r.status, (await r.json())["reason"]) == (status, reason), (path, kind, headers)
            for path in ("/_emulator/state", "/_emulator/faults", "/_emulator/executions?account=alice&after=0"):
                async with http.get(emu.rest_url + path) as r:
                    assert r.status == 401, path
                    assert "accounts" not in await r.text()
                async with http.get(emu.rest_url + path, headers=wrong) as r:
                    assert r.status == 403, path

            # nothing was applied
            assert emu.faults.as_dict() == before_faults
            assert emu.engine.ledger.balance("alice", "USDT").free == before_usdt
            async with http.get(emu.rest_url + "/_emulator/state", headers=good) as r:
                state = await r.json()
            assert r.status == 200 and state["driven"] is False

            # with the token, each works
            async with http.post(emu.rest_url + "/_emulator/deposit", json=deposit, headers=good) as r:
                assert r.status == 200, await r.text()
            rest = ccxt_async.binance(ccxt_config(emu, KEY_A, SECRET_A))
            try:
                balance = await rest.fetch_balance()
            finally:
                await rest.close()
            assert Decimal(str(balance["USDT"]["free"])) == before_usdt + 1000
            async with http.post(emu.rest_url + "/_emulator/faults", json={"latency_ms": 1}, headers=good) as r:
                assert r.status == 200 and (await r.json())["latency_ms"] == 1
            async with http.post(emu.rest_url + "/_emulator/market/open", json=bar, headers=good) as r:
                assert r.status == 200, await r.text()

    run(body)


def test_the_admin_token_is_the_one_given() -> None:
    token = "a-token-chosen-by-the-test-0123"
    with EmulatorThread(two_accounts(admin_token=token)) as emu:
        assert emu.admin_token == token and token not in repr(emu.server.config)
        ok = urllib.request.Request(  # noqa: S310 - loopback
            emu.rest_url + "/_emulator/state", headers={ADMIN_TOKEN_HEADER: token}
        )
        with urllib.request.urlopen(ok, timeout=5) as resp:  # noqa: S310 - loopback
            assert json.load(resp)["accounts"] == ["alice", "bob"]
    with pytest.raises(ConfigurationError, match="admin token") as refused:
        two_accounts(admin_token="short")
    assert "short" not in str(refused.value)


# --- loopback only, unless asked ---------------------------------------------------------------------


def test_a_non_loopback_host_is_refused_without_allow_remote() -> None:
    for host in ["0.0.0.0", "::", "", "192.0.2.10", "example.org"]:  # noqa: S104
        with pytest.raises(ConfigurationError, match="allow_remote"):
            EmulatorConfig.single(KEY_A, SECRET_A, host=host)
        with pytest.raises(ConfigurationError, match="allow_remote"):
            EmulatorThread(EmulatorConfig.single(KEY_A, SECRET_A, host=host))
    for host in ["127.0.0.1", "127.0.0.2", "localhost", "::1"]:  # loopback needs no flag
        assert EmulatorConfig.single(KEY_A, SECRET_A, host=host).host == host


def test_allow_remote_binds_every_interface() -> None:
    config = EmulatorConfig.single(KEY_A, SECRET_A, host="0.0.0.0", allow_remote=True)  # noqa: S104
    with EmulatorThread(config) as emu:
        rest = ccxt.binance(
            {**ccxt_config(emu, KEY_A, SECRET_A), "urls": {"api": ccxt_urls_for(_loopback(emu.server.port))}}
        )
        assert rest.fetch_time() > 0


def _loopback(port: int) -> str:
    return f"http://127.0.0.1:{port}"


# --- listenKey ownership -------------------------------------------------------------------------------


def test_one_account_cannot_keep_alive_or_close_anothers_listen_key() -> None:
    async def body() -> None:
        async with EmulatorServer(two_accounts()) as emu, aiohttp.ClientSession() as http:
            alice = ccxt_async.binance(ccxt_config(emu, KEY_A, SECRET_A))
            bob = ccxt_async.binance(ccxt_config(emu, KEY_B, SECRET_B))
            try:
                alice_key = (await alice.publicPostUserDataStream())["listenKey"]
                bob_key = (await bob.publicPostUserDataStream())["listenKey"]
                assert alice_key != bob_key
                async with http.ws_connect(f"{emu.ws_url}/ws/{alice_key}") as stream:
                    await _until_subscribed(emu, http, "alice")
                    # Binance's answer for a key that is not the caller's: as if it did not exist
                    with pytest.raises(ccxt.AuthenticationError, match="-1125") as refused:
                        await bob.publicPutUserDataStream({"listenKey": alice_key})
                    assert "This listenKey does not exist." in str(refused.value)
                    with pytest.raises(ccxt.AuthenticationError, match="-1125"):
                        await bob.publicDeleteUserDataStream({"listenKey": alice_key})
                    # alice's key and stream are untouched
                    assert await alice.publicPutUserDataStream({"listenKey": alice_key}) == {}
                    async with http.post(
                        emu.rest_url + "/_emulator/deposit",
                        json={"account": "alice", "asset": "USDT", "amount": "5"},
                        headers=emu.admin_headers(),
                    ) as r:
                        assert r.status == 200
                    event = await stream.receive_json(timeout=10)
                    assert (event["e"], event["a"], event["d"]) == ("balanceUpdate", "USDT", "5.00000000")
                    # bob's own key works, and closing it is bob's to do
                    assert await bob.publicPutUserDataStream({"listenKey": bob_key}) == {}
                    assert await bob.publicDeleteUserDataStream({"listenKey": bob_key}) == {}
                    with pytest.raises(ccxt.AuthenticationError, match="-1125"):
                        await bob.publicPutUserDataStream({"listenKey": bob_key})
                    assert await alice.publicPutUserDataStream({"listenKey": alice_key}) == {}
            finally:
                await alice.close()
                await bob.close()

    run(body)


async def _until_subscribed(emu: EmulatorServer, http: aiohttp.ClientSession, account: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        async with http.get(emu.rest_url + "/_emulator/state", headers=emu.admin_headers()) as r:
            if (await r.json())["user_subscriptions"][account] >= 1:
                return
        assert time.monotonic() < deadline, f"no user stream for {account}"
        await asyncio.sleep(0.02)


# --- the CLI -------------------------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "meltica", "emulator", "binance", *args]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MELTICA_EMULATOR_")}
    return {**env, "COLUMNS": "250", **extra}


def test_cli_refuses_a_non_loopback_host_without_allow_remote(free_port: Callable[[], int]) -> None:
    env = _clean_env(MELTICA_EMULATOR_API_SECRET=SECRET_A)
    argv = _cli("--host", "0.0.0.0", "--port", str(free_port()), "--api-key", KEY_A)  # noqa: S104
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--allow-remote" in done.stderr


@pytest.mark.parametrize("flag", ["--api-secret", "--account"])
def test_cli_refuses_a_secret_on_the_command_line(flag: str, free_port: Callable[[], int]) -> None:
    # Secrets of their own: while this refused command runs, `ps` shows them, and a test running beside it
    # (pytest-xdist) checks that the served emulator's SECRET_A/B appear nowhere in `ps`.
    refused = "refused-secret-0123456789"
    value = refused if flag == "--api-secret" else f"bob:{KEY_B}:{refused}"
    argv = _cli("--port", str(free_port()), "--api-key", KEY_A, flag, value)
    env = _clean_env(MELTICA_EMULATOR_API_SECRET=refused)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "ps" in done.stderr and ("--api-secret-file" in done.stderr or "--accounts-file" in done.stderr)


@contextlib.contextmanager
def _serving(argv: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, f"emulator not listening after 30 s:\n{log.read_text()}"
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _admin_status(port: int, token: str | None) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/_emulator/state", headers={ADMIN_TOKEN_HEADER: token} if token else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310 - loopback
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _assert_not_in_ps(proc: subprocess.Popen[bytes], *secrets: str) -> None:
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert "--api-key" in cmdline  # it is the right process
    listing = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True, check=True).stdout
    assert str(proc.pid) in listing
    for secret in secrets:
        assert secret not in cmdline and secret not in listing


def test_cli_takes_the_secret_from_the_environment_and_prints_a_generated_admin_token(
    free_port: Callable[[], int], tmp_path: Path
) -> None:
    port = free_port()
    token_file = tmp_path / "admin-token"
    argv = _cli("--port", str(port), "--api-key", KEY_A, "--write-admin-token", str(token_file))
    log = tmp_path / "emulator.log"
    with _serving(argv, _clean_env(MELTICA_EMULATOR_API_SECRET=SECRET_A), port, log) as proc:
        token = token_file.read_text().strip()
        assert len(token) >= 32 and token_file.stat().st_mode & 0o777 == 0o600
        _assert_not_in_ps(proc, SECRET_A, token)
        rest = ccxt.binance({**ccxt_config_for(port), "apiKey": KEY_A, "secret": SECRET_A})
        assert rest.fetch_balance()["USDT"]["free"] == 10_000  # a signed request
        assert (_admin_status(port, None), _admin_status(port, "x" * 40), _admin_status(port, token)) == (
            401,
            403,
            200,
        )
        _wait_for_text(log, token)
    assert log.read_text().count(token) == 1  # printed once


def test_cli_takes_the_secret_and_admin_token_from_files(free_port: Callable[[], int], tmp_path: Path) -> None:
    port = free_port()
    secret_file, token_file, accounts_file = tmp_path / "secret", tmp_path / "token", tmp_path / "accounts"
    secret_file.write_text(SECRET_A + "\n")
    token = "admin-token-from-a-file-0123456789"
    token_file.write_text(token + "\n")
    accounts_file.write_text(f"# more accounts\n\nbob:{KEY_B}:{SECRET_B}\n")
    argv = _cli("--port", str(port), "--api-key", KEY_A, "--api-secret-file", str(secret_file))
    argv += ["--admin-token-file", str(token_file), "--accounts-file", str(accounts_file)]
    log = tmp_path / "emulator.log"
    with _serving(argv, _clean_env(), port, log) as proc:
        _assert_not_in_ps(proc, SECRET_A, SECRET_B, token)
        for key, secret in ((KEY_A, SECRET_A), (KEY_B, SECRET_B)):
            rest = ccxt.binance({**ccxt_config_for(port), "apiKey": key, "secret": secret})
            assert rest.fetch_balance()["BTC"]["free"] == 1
        assert (_admin_status(port, None), _admin_status(port, token)) == (401, 200)
    assert token not in log.read_text()  # a given token is not printed


def _wait_for_text(log: Path, text: str) -> None:
    deadline = time.monotonic() + 10
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"{log} never said it:\n{log.read_text()}"
        time.sleep(0.05)


def ccxt_config_for(port: int) -> dict[str, Any]:
    return {"urls": {"api": ccxt_urls_for(_loopback(port))}, "options": {"fetchMarkets": {"types": ["spot"]}}}
