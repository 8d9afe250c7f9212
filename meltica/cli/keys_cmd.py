"""`meltica keys` commands: encrypted exchange API credentials (add, list, remove, rotate the master key).

Credentials are read from standard input (one per line: API key, API secret, optional passphrase) or from
hidden prompts, never from the command line, where they would land in shell history and ``ps`` output.
"""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from meltica.cli._common import console, database_engine, reports_errors
from meltica.errors import ConfigurationError, SecretError
from meltica.secrets import NEW_MASTER_KEY_ENV, Credentials, CredentialStore, MasterKey
from meltica.secrets.redaction import register_secret

app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False)


class StoreKind(StrEnum):
    database = "database"
    vault = "vault"


StoreOption = Annotated[
    StoreKind,
    typer.Option(
        "--store", help="Where credentials live: the database (encrypted with the master key) or Vault KV v2."
    ),
]


def _store(kind: StoreKind) -> CredentialStore:
    if kind is StoreKind.vault:
        from meltica.secrets.vault import VaultCredentialStore

        return VaultCredentialStore.from_env()
    from meltica.secrets.database import DatabaseCredentialStore

    return DatabaseCredentialStore(database_engine())


def _read_credentials() -> Credentials:
    if sys.stdin.isatty():
        api_key = typer.prompt("API key", hide_input=True)
        api_secret = typer.prompt("API secret", hide_input=True)
        passphrase = typer.prompt(
            "passphrase (empty if the exchange has none)", hide_input=True, default="", show_default=False
        )
    else:
        lines = [line.rstrip("\r\n") for line in sys.stdin.read().splitlines()]
        api_key, api_secret, passphrase = ([*lines, "", "", ""])[:3]
    register_secret(api_key, api_secret, passphrase)
    try:
        return Credentials.of(api_key.strip(), api_secret.strip(), passphrase.strip() or None)
    except ValidationError:
        raise ConfigurationError(
            "an API key and an API secret are required (stdin: one per line, then an optional passphrase)"
        ) from None


@app.command("add")
@reports_errors
def add(
    account: Annotated[str, typer.Argument(help="Account name, as in the configuration's accounts list.")],
    exchange: Annotated[str, typer.Option("--exchange", "-x", help="ccxt exchange id, e.g. binance.")],
    store: StoreOption = StoreKind.database,
) -> None:
    """Store an account's API credentials, read from stdin or hidden prompts; replaces existing ones."""
    credentials = _read_credentials()
    _store(store).put(account, exchange, credentials)
    console.print(
        f"stored credentials for account {account} ({exchange}, key fingerprint {credentials.fingerprint})",
        highlight=False,
    )


@app.command("list")
@reports_errors
def list_(store: StoreOption = StoreKind.database) -> None:
    """List stored credentials: account, exchange, key fingerprint and dates (never the keys)."""
    infos = _store(store).list()
    if not infos:
        console.print("no credentials stored")
        return
    from rich.table import Table

    table = Table("account", "exchange", "key fingerprint", "created", "rotated")
    for info in infos:
        table.add_row(
            info.account,
            info.exchange,
            info.key_fingerprint,
            info.created_at.isoformat(timespec="seconds"),
            info.rotated_at.isoformat(timespec="seconds") if info.rotated_at else "-",
        )
    console.print(table)


@app.command("remove")
@reports_errors
def remove(
    account: Annotated[str, typer.Argument(help="Account whose credentials to delete.")],
    store: StoreOption = StoreKind.database,
) -> None:
    """Delete an account's stored credentials."""
    _store(store).remove(account)
    console.print(f"removed credentials of account {account}", highlight=False)


@app.command("rotate-master")
@reports_errors
def rotate_master(
    new_key_file: Annotated[
        Path | None,
        typer.Option("--new-key-file", help=f"File (mode 0600) with the new master key; else ${NEW_MASTER_KEY_ENV}."),
    ] = None,
) -> None:
    """Re-encrypt every stored credential under a new master key, in one transaction.

    The current key comes from the usual place (MELTICA_MASTER_KEY, MELTICA_MASTER_KEY_FILE or the keyring).
    Afterwards, replace the current key with the new one there.
    """
    from meltica.secrets.database import rotate_master_key

    if new_key_file is not None:
        new_key = MasterKey.from_file(new_key_file)
    else:
        text = os.environ.get(NEW_MASTER_KEY_ENV, "").strip()
        if not text:
            raise ConfigurationError(f"give the new master key with --new-key-file or ${NEW_MASTER_KEY_ENV}")
        new_key = MasterKey(text, source=NEW_MASTER_KEY_ENV)
    old_key = MasterKey.load()
    try:
        count = rotate_master_key(database_engine(), old_key, new_key)
    except SecretError as exc:
        raise SecretError(f"{exc}; nothing was changed", reason=exc.reason) from None
    console.print(
        f"re-encrypted {count} credential(s) with the new master key; now replace the master key "
        f"({old_key.source}) with the new one",
        highlight=False,
    )
