"""`VaultCredentialStore` through hvac's real client, against a small local emulator of Vault's KV v2 HTTP API.

No Vault server can be installed here (no registry we reach ships one: `go install github.com/hashicorp/vault`
is refused because its go.mod has replace directives, and Debian has only the hvac client). So the test runs
hvac's own ``Client`` over HTTP against :class:`KvV2Emulator`, which implements the four endpoints the store
uses — read a secret version, create/update, list, delete metadata and all versions — with Vault's paths,
methods, token header, JSON shapes and 404/403 answers. It checks the store's logic and its use of the
protocol, not Vault itself.
"""

from __future__ import annotations

import json
import logging
import threading
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import hvac  # type: ignore[import-untyped]
import pytest

from meltica.errors import SecretError
from meltica.secrets import (
    Credentials,
    CredentialsNotFoundError,
    CredentialStore,
    VaultCredentialStore,
    key_fingerprint,
)
from tests.kit import ManualClock

# Not `integration`: no real server here, only the in-test emulator above (see the module docstring).
pytestmark = pytest.mark.protocol_emulator

TOKEN = "s.test-root-token"
KNOWN_SECRET = "S3CRET-known-value-123"
KNOWN_KEY = "APIKEY-known-value-456"


class KvV2Emulator(ThreadingHTTPServer):
    """Vault's KV v2 engine at mount ``secret``: ``/v1/secret/data/<path>`` and ``/v1/secret/metadata/<path>``."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.versions: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: KvV2Emulator

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _reply(self, status: int, body: dict[str, Any] | None = None) -> None:
        payload = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _route(self) -> tuple[str, str] | None:
        self.server.requests.append((self.command, self.path))
        if self.headers.get("X-Vault-Token") != TOKEN:
            self._reply(403, {"errors": ["permission denied"]})
            return None
        path = self.path.split("?", 1)[0]
        for kind in ("data", "metadata"):
            prefix = f"/v1/secret/{kind}/"
            if path.startswith(prefix):
                return kind, path[len(prefix) :].strip("/")
        self._reply(404, {"errors": []})
        return None

    def do_GET(self) -> None:
        route = self._route()
        if route is None:
            return
        kind, path = route
        if kind == "metadata" and "list=true" in self.path:
            return self._list(path)
        with self.server.lock:
            versions = self.server.versions.get(path)
        if kind != "data" or not versions:
            return self._reply(404, {"errors": []})
        latest = versions[-1]
        self._reply(
            200,
            {
                "data": {
                    "data": latest["data"],
                    "metadata": {
                        "created_time": latest["created_time"],
                        "deletion_time": "",
                        "destroyed": False,
                        "version": len(versions),
                    },
                }
            },
        )

    def do_POST(self) -> None:
        route = self._route()
        if route is None:
            return
        kind, path = route
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        if kind != "data" or not isinstance(body.get("data"), dict):
            return self._reply(400, {"errors": ["no data provided"]})
        created = datetime.now(UTC).isoformat()
        with self.server.lock:
            versions = self.server.versions.setdefault(path, [])
            versions.append({"data": body["data"], "created_time": created})
            version = len(versions)
        self._reply(
            200, {"data": {"created_time": created, "deletion_time": "", "destroyed": False, "version": version}}
        )

    do_PUT = do_POST  # noqa: N815 (http.server names handlers do_<METHOD>)

    def do_LIST(self) -> None:
        route = self._route()
        if route is not None:
            self._list(route[1])

    def _list(self, folder: str) -> None:
        prefix = f"{folder}/" if folder else ""
        with self.server.lock:
            names = {p[len(prefix) :] for p in self.server.versions if p.startswith(prefix)}
        keys = sorted({n.split("/", 1)[0] + "/" if "/" in n else n for n in names})
        if not keys:
            return self._reply(404, {"errors": []})
        self._reply(200, {"data": {"keys": keys}})

    def do_DELETE(self) -> None:
        route = self._route()
        if route is None:
            return
        kind, path = route
        if kind != "metadata":
            return self._reply(405, {"errors": ["unsupported"]})
        with self.server.lock:
            self.server.versions.pop(path, None)
        self._reply(204)


@pytest.fixture
def vault() -> Iterator[KvV2Emulator]:
    server = KvV2Emulator()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_vault_store_round_trip(vault: KvV2Emulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    clock = ManualClock(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), tick=timedelta(minutes=1))  # stamps move on
    store = VaultCredentialStore(hvac.Client(url=vault.url, token=TOKEN), clock=clock)
    assert isinstance(store, CredentialStore)
    assert store.list() == []

    store.put("main", "binance", Credentials.of(KNOWN_KEY, KNOWN_SECRET, "PASSPHRASE-1"))
    store.put("sub", "okx", Credentials.of("key-sub-000000", "secret-sub-000000"))
    assert "secret/data/meltica/credentials/main" in json.dumps(vault.requests)
    got = store.get("main")
    assert got.api_secret.get_secret_value() == KNOWN_SECRET
    assert got.passphrase is not None
    assert got.passphrase.get_secret_value() == "PASSPHRASE-1"
    assert store.get("sub").passphrase is None

    infos = store.list()
    assert [(i.account, i.exchange, i.key_fingerprint) for i in infos] == [
        ("main", "binance", key_fingerprint(KNOWN_KEY)),
        ("sub", "okx", key_fingerprint("key-sub-000000")),
    ]
    assert infos[0].rotated_at is None

    store.put("main", "binance", Credentials.of("APIKEY-new-000000", "SECRET-new-000000"))
    main = store.list()[0]
    assert main.created_at == infos[0].created_at  # creation time kept across the new version
    assert main.rotated_at is not None
    assert main.rotated_at > main.created_at
    assert len(vault.versions["meltica/credentials/main"]) == 2

    store.remove("sub")
    assert [i.account for i in store.list()] == ["main"]
    with pytest.raises(CredentialsNotFoundError):
        store.get("sub")
    with pytest.raises(CredentialsNotFoundError):
        store.remove("sub")
    assert KNOWN_SECRET not in caplog.text
    assert "stored credentials for account main in Vault" in caplog.text


def test_vault_errors_are_clear_and_clean(vault: KvV2Emulator) -> None:
    store = VaultCredentialStore(hvac.Client(url=vault.url, token=TOKEN))
    store.put("main", "binance", Credentials.of(KNOWN_KEY, KNOWN_SECRET))
    denied = VaultCredentialStore(hvac.Client(url=vault.url, token="s.wrong"))
    with pytest.raises(SecretError, match="Vault could not read credentials of main: Forbidden") as info:
        denied.get("main")
    rendered = "".join(traceback.format_exception(info.value))
    assert KNOWN_SECRET not in rendered
    assert TOKEN not in rendered
    with pytest.raises(SecretError, match="invalid account name"):
        store.get("../etc")
    unreachable = VaultCredentialStore(hvac.Client(url="http://127.0.0.1:9", token=TOKEN))
    with pytest.raises(SecretError, match="Vault could not read credentials of main: ConnectionError"):
        unreachable.get("main")


def test_vault_store_from_env(vault: KvV2Emulator) -> None:
    with pytest.raises(SecretError, match="needs VAULT_ADDR and VAULT_TOKEN"):
        VaultCredentialStore.from_env({})
    store = VaultCredentialStore.from_env({"VAULT_ADDR": vault.url, "VAULT_TOKEN": TOKEN}, prefix="team/a")
    store.put("main", "binance", Credentials.of(KNOWN_KEY, KNOWN_SECRET))
    assert "team/a/main" in vault.versions
    assert [i.account for i in store.list()] == ["main"]


def test_keys_cli_with_vault_store(vault: KvV2Emulator) -> None:
    from typer.testing import CliRunner

    from meltica.cli import app

    env = {"VAULT_ADDR": vault.url, "VAULT_TOKEN": TOKEN, "MELTICA_MASTER_KEY": "", "MELTICA_MASTER_KEY_FILE": ""}
    runner = CliRunner()
    added = runner.invoke(
        app,
        ["keys", "add", "main", "-x", "binance", "--store", "vault"],
        input=f"{KNOWN_KEY}\n{KNOWN_SECRET}\n",
        env=env,
    )
    assert added.exit_code == 0, added.output
    listed = runner.invoke(app, ["keys", "list", "--store", "vault"], env=env)
    assert listed.exit_code == 0, listed.output
    assert key_fingerprint(KNOWN_KEY) in listed.stdout
    for output in (added.output, listed.output):
        assert KNOWN_SECRET not in output
        assert KNOWN_KEY not in output
