"""Adapters from configuration: ``accounts[].exchange`` picks the venue, credentials come from references.

A user never edits code to switch exchange, environment, or paper vs live (DESIGN.md §1): this module turns
an ``AccountConfig`` into a ready ``ExchangeAdapter``.
"""

from __future__ import annotations

from typing import Any

from meltica.adapters.base import ExchangeAdapter
from meltica.adapters.local_venue import CCXT_OPTIONS, ccxt_urls_for
from meltica.adapters.registry import PAPER, create_adapter
from meltica.config.settings import AccountConfig, MelticaSettings
from meltica.errors import ConfigurationError
from meltica.secrets import CredentialsNotFoundError, CredentialStore, register_secret


def ccxt_credentials(
    account: AccountConfig, *, allow_plaintext: bool, store: CredentialStore | None = None
) -> dict[str, str]:
    """ccxt's credential names for ``account``: configured references first, else the credential store.

    Every resolved value is registered with the log redaction, so it can never be logged in clear.
    """
    resolved = {
        "apiKey": account.credential("api_key", allow_plaintext=allow_plaintext),
        "secret": account.credential("api_secret", allow_plaintext=allow_plaintext),
        "password": account.credential("password", allow_plaintext=allow_plaintext),
    }
    if resolved["apiKey"] is None and store is not None:
        try:
            stored = store.get(account.name)
        except CredentialsNotFoundError:
            stored = None
        if stored is not None:
            resolved = {"apiKey": stored.api_key, "secret": stored.api_secret, "password": stored.passphrase}
    out: dict[str, str] = {}
    for name, secret in resolved.items():
        if secret is not None:
            value = secret.get_secret_value()
            register_secret(value)
            out[name] = value
    return out


def adapter_for_account(
    settings: MelticaSettings,
    account_name: str,
    *,
    credential_store: CredentialStore | None = None,
    **adapter_kwargs: Any,
) -> ExchangeAdapter:
    """The adapter for the configured account ``account_name``.

    ``exchange: paper`` needs ``venue=InProcessVenue(...)`` in ``adapter_kwargs``; ``emulator_url`` points a
    ccxt venue (Binance) at the local emulator; ``sandbox`` selects the venue's testnet.
    """
    account = next((a for a in settings.accounts if a.name == account_name), None)
    if account is None:
        known = ", ".join(a.name for a in settings.accounts) or "none"
        raise ConfigurationError(
            f"no account named {account_name!r} in the {settings.environment} configuration (known: {known})",
            field="accounts",
        )
    if account.exchange == PAPER:
        return create_adapter(PAPER, account=account.name, **adapter_kwargs)
    credentials = ccxt_credentials(account, allow_plaintext=settings.environment != "prod", store=credential_store)
    urls: dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    if account.emulator_url is not None:
        urls = {"api": ccxt_urls_for(account.emulator_url)}
        options = dict(CCXT_OPTIONS)
    return create_adapter(
        account.exchange,
        account=account.name,
        credentials=credentials,
        sandbox=account.sandbox,
        urls=urls,
        options=options,
        **adapter_kwargs,
    )
