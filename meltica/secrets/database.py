"""Credentials in the ``credentials`` table, each field a Fernet token under the master key."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, Engine, RowMapping, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert

from meltica.errors import SecretError
from meltica.secrets.credentials import CredentialInfo, Credentials, CredentialsNotFoundError
from meltica.secrets.master_key import MasterKey
from meltica.secrets.redaction import register_secret
from meltica.storage.tables import credentials as credentials_table

logger = logging.getLogger(__name__)

_FIELDS = ("api_key", "api_secret", "passphrase")


class DatabaseCredentialStore:
    """A :class:`~meltica.secrets.credentials.CredentialStore` over the ``credentials`` table.

    The master key is needed only to put and get; ``list`` and ``remove`` work without it. When no key is
    given it is loaded (environment, key file, keyring) the first time one is needed.
    """

    def __init__(
        self, engine: Engine, key: MasterKey | None = None, *, environ: Mapping[str, str] | None = None
    ) -> None:
        self._engine = engine
        self._key = key
        self._environ = environ

    @property
    def master_key(self) -> MasterKey:
        if self._key is None:
            self._key = MasterKey.load(self._environ)
        return self._key

    def put(self, account: str, exchange: str, credentials: Credentials) -> None:
        key = self.master_key
        values: dict[str, Any] = {
            "account": account,
            "exchange": exchange,
            "api_key_ciphertext": key.encrypt(credentials.api_key.get_secret_value()),
            "api_secret_ciphertext": key.encrypt(credentials.api_secret.get_secret_value()),
            "passphrase_ciphertext": (
                key.encrypt(credentials.passphrase.get_secret_value()) if credentials.passphrase else None
            ),
            "key_fingerprint": credentials.fingerprint,
        }
        stmt = insert(credentials_table).values(**values)
        # Replacing an account's credentials is a rotation: created_at stays, rotated_at moves.
        stmt = stmt.on_conflict_do_update(
            index_elements=[credentials_table.c.account],
            set_={**{name: stmt.excluded[name] for name in values if name != "account"}, "rotated_at": func.now()},
        )
        with self._engine.begin() as conn:
            conn.execute(stmt)
        logger.info("stored credentials for account %s (%s, key %s)", account, exchange, credentials.fingerprint)

    def get(self, account: str) -> Credentials:
        with self._engine.connect() as conn:
            row = (
                conn.execute(select(credentials_table).where(credentials_table.c.account == account)).mappings().first()
            )
        if row is None:
            raise CredentialsNotFoundError(f"no credentials stored for account {account}", account=account)
        plain = _decrypt_row(self.master_key, row)
        for value in plain.values():
            if value:
                register_secret(value)
        return Credentials.of(plain["api_key"] or "", plain["api_secret"] or "", plain["passphrase"])

    def list(self) -> list[CredentialInfo]:
        table = credentials_table
        query = select(
            table.c.account, table.c.exchange, table.c.key_fingerprint, table.c.created_at, table.c.rotated_at
        ).order_by(table.c.account)
        with self._engine.connect() as conn:
            return [CredentialInfo.model_validate(dict(row)) for row in conn.execute(query).mappings()]

    def remove(self, account: str) -> None:
        with self._engine.begin() as conn:
            deleted = conn.execute(delete(credentials_table).where(credentials_table.c.account == account)).rowcount
        if not deleted:
            raise CredentialsNotFoundError(f"no credentials stored for account {account}", account=account)
        logger.info("removed credentials of account %s", account)

    def rotate_master_key(self, new_key: MasterKey) -> int:
        """Re-encrypt every row under ``new_key`` (one transaction); afterwards this store uses ``new_key``."""
        count = rotate_master_key(self._engine, self.master_key, new_key)
        self._key = new_key
        return count


def _decrypt_row(key: MasterKey, row: RowMapping) -> dict[str, str | None]:
    account = row["account"]
    plain: dict[str, str | None] = {}
    for name in _FIELDS:
        token = row[f"{name}_ciphertext"]
        plain[name] = None if token is None else key.decrypt(bytes(token), what=f"the {name} of account {account}")
    return plain


def rotate_master_key(engine: Engine, old_key: MasterKey, new_key: MasterKey, *, dry_run: bool = False) -> int:
    """Re-encrypt every stored credential from ``old_key`` to ``new_key`` in ONE transaction.

    Every row is locked, decrypted with the old key and written back under the new one; when any row
    cannot be decrypted (or anything else fails) the transaction rolls back and no row has changed.
    Returns how many accounts were re-encrypted. ``dry_run`` decrypts every row and writes nothing.
    """
    if new_key.same_as(old_key):
        raise SecretError("the new master key is the same as the current one", reason="master_key_unchanged")
    with engine.begin() as conn:
        return _reencrypt_all(conn, old_key, new_key, dry_run=dry_run)


def _reencrypt_all(conn: Connection, old_key: MasterKey, new_key: MasterKey, *, dry_run: bool = False) -> int:
    table = credentials_table
    query = select(table).order_by(table.c.account)
    rows = conn.execute(query if dry_run else query.with_for_update()).mappings().all()
    for row in rows:
        plain = _decrypt_row(old_key, row)
        if dry_run:
            continue
        conn.execute(
            update(table)
            .where(table.c.account == row["account"])
            .values(
                {
                    f"{name}_ciphertext": None if value is None else new_key.encrypt(value)
                    for name, value in plain.items()
                }
                | {"rotated_at": func.now()}
            )
        )
    if not dry_run:
        logger.info("re-encrypted %d credential row(s) under a new master key", len(rows))
    return len(rows)
