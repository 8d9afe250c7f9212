"""One live deployment from one settings file: the pipeline, the Kafka and database addresses, the accounts'
adapters with their credentials.

A live deployment is one settings YAML (``meltica live start --config FILE``): the top-level ``accounts``
(venue and credentials) and ``risk`` (limits), and the ``live`` section (strategy instances, workers, topic
prefix). Every process of the deployment (ingest, each worker, sinks) reads the same file through this
module, so they agree on what trades where and under which limits.

* :func:`load_live_settings` — the settings, refused (``ConfigurationError`` naming every missing limit or
  bad account) when :func:`meltica.config.loader.check_live` fails;
* :func:`pipeline_config` — the ``PipelineConfig`` of the stages: the instances, each account on its venue
  (``exchange: paper`` is the in-process paper venue, anything else the real venue), live (not lock-step),
  the limits of ``risk:``;
* :func:`kafka_bootstrap`, :func:`database_url`, :func:`topic_prefix`, :func:`app_id` — where things are;
* :func:`account_adapter` — the adapter of an account, credentials from ``env:`` / ``encrypted:`` references
  (API key and secret alike) or else from the credential store ``meltica keys add`` writes; every secret
  resolved is registered for log redaction;
* :func:`venue_instruments` — the instruments of an account's symbols as the venue lists them.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine

from meltica.adapters.base import ExchangeAdapter
from meltica.adapters.factory import adapter_for_account
from meltica.adapters.registry import PAPER
from meltica.backtest.config import default_instrument
from meltica.config.loader import check_live, load_settings
from meltica.config.settings import LiveWorker, MelticaSettings
from meltica.domain import Instrument
from meltica.errors import ConfigurationError
from meltica.infra.kafka import ensure_kafka
from meltica.infra.postgres import ensure_postgres
from meltica.live.config import AccountVenueConfig, PipelineConfig, StrategyInstanceConfig
from meltica.secrets import CredentialStore, register_secret, resolve_secret
from meltica.secrets.database import DatabaseCredentialStore

log = logging.getLogger(__name__)

BOOTSTRAP_ENV = "MELTICA_KAFKA_BOOTSTRAP"

Venue = Literal["paper", "exchange"]


def load_live_settings(path: str | Path) -> MelticaSettings:
    """The settings in ``path``, checked for live trading (``check_live``): ``ConfigurationError`` otherwise."""
    return check_live(load_settings(config_file=path), str(path))


def account_venue(settings: MelticaSettings, account: str) -> Venue:
    """``paper`` for ``exchange: paper`` (the in-process paper venue: tests and dry runs), else ``exchange``."""
    return "paper" if settings.account(account).exchange == PAPER else "exchange"


def default_instruments(settings: MelticaSettings, account: str) -> list[Instrument]:
    """The built-in precision of every symbol the account's instances trade (no venue needed)."""
    exchange = settings.account(account).exchange
    symbols = _symbols_of(settings, account)
    return [default_instrument(exchange, symbol) for symbol in symbols]


def _symbols_of(settings: MelticaSettings, account: str) -> list[str]:
    seen: dict[str, None] = {}
    for instance in settings.live.instances:
        if instance.account == account:
            seen.update(dict.fromkeys(instance.symbols))
    return list(seen)


async def venue_instruments(adapter: ExchangeAdapter, symbols: Iterable[str]) -> list[Instrument]:
    """The instruments of ``symbols`` as the venue lists them (``load_instruments``); a symbol the venue
    does not list is a configuration error (the order would be refused there anyway)."""
    listed = await adapter.load_instruments()
    missing = [s for s in symbols if s not in listed]
    if missing:
        raise ConfigurationError(
            f"account {adapter.account}: {adapter.exchange_id} lists no market {', '.join(missing)}",
            field="live.instances",
        )
    return [listed[s] for s in symbols]


def pipeline_config(
    settings: MelticaSettings, instruments: Mapping[str, Sequence[Instrument]] | None = None
) -> PipelineConfig:
    """The live ``PipelineConfig``: ``settings.live.instances`` (exchange = the account's), every account of
    an instance on its venue, not lock-step, ``risk`` = the settings' limits. ``instruments``: per account,
    as the venue lists them (default: the built-in precision, :func:`default_instruments`)."""
    instances = tuple(
        StrategyInstanceConfig(
            instance_id=i.instance_id,
            strategy=i.strategy,
            params=dict(i.params),
            account=i.account,
            exchange=settings.account(i.account).exchange,
            symbols=tuple(i.symbols),
            timeframe=i.timeframe,
        )
        for i in settings.live.instances
    )
    accounts: dict[str, AccountVenueConfig] = {}
    for name in sorted({i.account for i in settings.live.instances}):
        exchange = settings.account(name).exchange
        listed = (instruments or {}).get(name)
        accounts[name] = AccountVenueConfig(
            exchange=exchange,
            venue=account_venue(settings, name),
            instruments=tuple(listed) if listed is not None else tuple(default_instruments(settings, name)),
        )
    return PipelineConfig(instances=instances, accounts=accounts, lockstep=False, risk=settings.risk)


def kafka_bootstrap(settings: MelticaSettings) -> str:
    """``kafka.bootstrap_servers``, else ``MELTICA_KAFKA_BOOTSTRAP``, else the local dev broker."""
    if settings.kafka.bootstrap_servers:
        return settings.kafka.bootstrap_servers
    if os.environ.get(BOOTSTRAP_ENV):
        return os.environ[BOOTSTRAP_ENV]

    return ensure_kafka().bootstrap_servers


def database_url(settings: MelticaSettings) -> str:
    """``database_url`` (a reference is resolved and its value registered for redaction), else the runtime
    role on the local PostgreSQL (``meltica infra``)."""
    if settings.database_url is not None:
        value = resolve_secret(settings.database_url, allow_plaintext=True).get_secret_value()
        register_url_password(value)
        return value

    return ensure_postgres().runtime_url


def register_url_password(url: str) -> None:
    """Scrub the password of a ``scheme://user:password@host/...`` URL from the logs (no-op without one)."""
    match = re.match(r"^[^:/]+(?:\+[^:/]+)?://[^:@/]*:([^@/]+)@", url)
    if match:
        register_secret(match.group(1))


def topic_prefix(settings: MelticaSettings) -> str:
    return settings.live.topic_prefix


def app_id(settings: MelticaSettings, process: str) -> str:
    """The Faust app id (= consumer group, and the prefix of its changelog topics) of one process of the
    deployment: ``meltica-live-<process>`` for the default prefix ``live.``; another prefix takes its place,
    so two deployments on one broker never share a group."""
    prefix = re.sub(r"[^A-Za-z0-9_-]+", "-", settings.live.topic_prefix).strip("-") or "live"
    return f"meltica-{prefix}-{process}"


def live_worker(settings: MelticaSettings, name: str) -> LiveWorker:
    """The worker ``name`` of ``live.workers`` (``ConfigurationError`` listing the known ones)."""
    for worker in settings.live.workers:
        if worker.name == name:
            return worker
    known = ", ".join(w.name for w in settings.live.workers)
    raise ConfigurationError(f"live.workers: no worker named {name!r} (workers: {known})", field="live.workers")


def credential_store(engine: Engine) -> CredentialStore:
    """The store ``meltica keys add`` writes (the ``credentials`` table, encrypted with the master key)."""
    return DatabaseCredentialStore(engine)


def account_adapter(
    settings: MelticaSettings, account: str, *, store: CredentialStore | None, **adapter_kwargs: Any
) -> ExchangeAdapter:
    """The adapter of a configured (non-paper) account: credentials from its ``api_key`` / ``api_secret``
    references (``env:NAME``, ``encrypted:…``; key and secret alike), else from ``store``; every value
    resolved is registered for log redaction (``meltica.adapters.factory.adapter_for_account``)."""
    return adapter_for_account(settings, account, credential_store=store, **adapter_kwargs)


__all__ = [
    "account_adapter",
    "account_venue",
    "app_id",
    "credential_store",
    "database_url",
    "default_instruments",
    "kafka_bootstrap",
    "live_worker",
    "load_live_settings",
    "pipeline_config",
    "register_url_password",
    "topic_prefix",
    "venue_instruments",
]
