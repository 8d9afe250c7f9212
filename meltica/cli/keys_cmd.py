"""`meltica keys` commands: encrypted exchange API credentials (add, list, remove, rotate the master key, which
also re-encrypts the ``encrypted:`` tokens of configuration files).

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
from rich.markup import escape
from rich.table import Table

from meltica.cli._common import console, database_engine, err_console, reports_errors
from meltica.config.loader import ENVIRONMENTS_DIR
from meltica.errors import ConfigurationError, SecretError
from meltica.secrets import ENCRYPTED_PREFIX, NEW_MASTER_KEY_ENV, Credentials, CredentialStore, MasterKey
from meltica.secrets.config_tokens import config_files, plan_config_rotation
from meltica.secrets.database import DatabaseCredentialStore, rotate_master_key
from meltica.secrets.redaction import register_secret
from meltica.secrets.vault import VaultCredentialStore

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
        return VaultCredentialStore.from_env()

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
    config: Annotated[
        list[Path] | None,
        typer.Option(
            "--config",
            "-c",
            help="Configuration file whose encrypted: tokens to re-encrypt, or a directory (its *.yaml/*.yml, "
            "recursively); repeatable. Default: the packaged configuration directory.",
        ),
    ] = None,
    no_database: Annotated[
        bool,
        typer.Option("--no-database", help="Leave the database's credentials alone; rotate only the files' tokens."),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Decrypt everything with the current key and say what would change; write nothing."
        ),
    ] = False,
) -> None:
    """Re-encrypt the stored credentials and the encrypted: tokens of configuration files under a new master key.

    The current key comes from MELTICA_MASTER_KEY, MELTICA_MASTER_KEY_FILE or the keyring, as usual.

    Database credentials are re-encrypted in one transaction.

    In configuration files only the tokens change; each file is replaced atomically after the database commits.

    A token the current key cannot decrypt is named by file, line and field (never its value); nothing changes, exit 1.

    A token the new key already decrypts is left as it is. Afterwards, replace the current key where it is kept.
    """
    if new_key_file is not None:
        new_key = MasterKey.from_file(new_key_file)
    else:
        text = os.environ.get(NEW_MASTER_KEY_ENV, "").strip()
        if not text:
            raise ConfigurationError(f"give the new master key with --new-key-file or ${NEW_MASTER_KEY_ENV}")
        new_key = MasterKey(text, source=NEW_MASTER_KEY_ENV)
    old_key = MasterKey.load()
    if new_key.same_as(old_key):
        raise SecretError("the new master key is the same as the current one", reason="master_key_unchanged")

    files = config_files(config or [ENVIRONMENTS_DIR.parent])
    plan = plan_config_rotation(files, old_key, new_key)
    for site in plan.undecryptable:
        err_console.print(
            f"[bold red]error:[/] {escape(str(site))}: encrypted token cannot be decrypted with the current master key "
            f"({escape(old_key.source)}) nor the new one",
            highlight=False,
            soft_wrap=True,
        )
    if plan.undecryptable:
        raise SecretError(
            f"{len(plan.undecryptable)} encrypted token(s) in configuration files cannot be decrypted with the "
            "current master key; nothing was changed",
            reason="secret_undecryptable",
        )
    _warn_about_environment_tokens()

    staged = None if dry_run else plan.stage()
    count: int | None = None
    try:
        if not no_database:
            count = rotate_master_key(database_engine(), old_key, new_key, dry_run=dry_run)
    except BaseException as exc:
        if staged is not None:
            staged.discard()  # the database did not rotate: the files must not either
        if isinstance(exc, SecretError):
            raise SecretError(f"{exc}; nothing was changed", reason=exc.reason) from None
        raise
    if staged is not None:
        staged.publish()

    verb = "would re-encrypt" if dry_run else "re-encrypted"
    for site in plan.reencrypted:
        console.print(f"{site}: {verb}", highlight=False, markup=False, soft_wrap=True)
    for site in plan.already_new:
        console.print(
            f"{site}: already under the new key, left as it is", highlight=False, markup=False, soft_wrap=True
        )
    if count is not None:
        console.print(f"{verb} {count} credential(s) in the database", highlight=False, markup=False, soft_wrap=True)
    console.print(
        f"{verb} {len(plan.reencrypted)} token(s) in {len(plan.changed_files)} of {len(files)} configuration file(s)",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    if not dry_run:
        console.print(
            f"now replace the master key ({old_key.source}) with the new one",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


def _warn_about_environment_tokens() -> None:
    """Tokens held in MELTICA_* variables cannot be rewritten from here; say which variables hold one."""
    for name, value in sorted(os.environ.items()):
        if name.upper().startswith("MELTICA_") and value.strip().startswith(ENCRYPTED_PREFIX):
            err_console.print(
                f"[yellow]warning:[/] environment variable {name} holds an encrypted: token, which this command "
                "cannot rewrite; replace it with one made under the new key (meltica config encrypt)",
                highlight=False,
                soft_wrap=True,
            )
