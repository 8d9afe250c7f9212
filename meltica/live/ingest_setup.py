"""The market-data ingest of a live deployment, built from its settings file (``live.ingest``).

* Subscriptions: every symbol of every strategy instance (``live.instances``), on its account's
  exchange, one per configured stream: ``trades`` → ``md.trades``, ``klines`` → closed 1-minute bars on
  ``md.candles.1m``, ``ticker`` → top of book on ``md.ticker``. More come from ``SubscribeCommand`` on
  ``control`` at run time.
* Venues: one adapter per exchange, built by ``meltica.adapters.factory.adapter_for_account`` from the
  first account on that exchange (so its ``emulator_url`` and ``sandbox`` apply) **without credentials**:
  market data is public, and the ingest process needs no keys.
* ``stale_after_s`` marks a silent stream stale (``MarketStatus`` on ``control``); the adapter itself
  reconnects a stream silent for twice that: a dead connection, or a ccxt pro watch that stopped
  answering after a reconnect (seen with the emulator, reported for real venues: ccxt issue 25092),
  is reopened and resubscribed, and the bars it missed are refetched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from meltica.adapters.base import ExchangeAdapter
from meltica.adapters.factory import adapter_for_account
from meltica.adapters.registry import PAPER
from meltica.config.settings import AccountConfig, IngestStream, MelticaSettings
from meltica.errors import ConfigurationError
from meltica.live.marketdata import Channel, MarketDataIngest, Subscription

STREAM_CHANNELS: dict[IngestStream, Channel] = {"trades": "trades", "klines": "candles.1m", "ticker": "ticker"}


def ingest_accounts(settings: MelticaSettings) -> dict[str, AccountConfig]:
    """Exchange → the account whose venue settings (emulator URL, sandbox) the ingest uses for it: the
    first configured account on that exchange that a strategy instance trades, else the first at all."""
    traded = {instance.account for instance in settings.live.instances}
    out: dict[str, AccountConfig] = {}
    for account in sorted(settings.accounts, key=lambda a: a.name not in traded):
        out.setdefault(account.exchange, account)
    return out


def ingest_subscriptions(settings: MelticaSettings) -> list[Subscription]:
    """One subscription per instance symbol and configured stream (duplicates merged), sorted."""
    by_name = {account.name: account for account in settings.accounts}
    subs: set[Subscription] = set()
    for instance in settings.live.instances:
        account = by_name.get(instance.account)
        if account is None:
            raise ConfigurationError(
                f"live instance {instance.instance_id!r} trades on unknown account {instance.account!r}",
                field="live.instances",
            )
        if account.exchange == PAPER:
            raise ConfigurationError(
                f"live instance {instance.instance_id!r}: account {account.name!r} is a paper account, "
                "it has no venue market data to ingest",
                field="live.instances",
            )
        for symbol in instance.symbols:
            for stream in settings.live.ingest.streams:
                subs.add(Subscription(account.exchange, symbol, STREAM_CHANNELS[stream]))
    return sorted(subs)


def ingest_problems(settings: MelticaSettings) -> list[str]:
    """What makes this settings file unfit for the ingest (besides ``check_live``)."""
    problems = []
    candle_workers = [w.name for w in settings.live.workers if "candles" in w.stages]
    if "klines" in settings.live.ingest.streams and candle_workers:
        problems.append(
            f"live.ingest.streams has klines and worker(s) {', '.join(candle_workers)} run the candles stage: "
            "both would publish md.candles.1m; drop one"
        )
    return problems


def public_adapter_factory(settings: MelticaSettings, **adapter_kwargs: Any) -> Callable[[str], ExchangeAdapter]:
    """Exchange id → a credential-free adapter configured like the deployment's account on it."""
    accounts = ingest_accounts(settings)
    public = settings.model_copy(
        update={
            "accounts": [
                account.model_copy(update={"api_key": None, "api_secret": None, "password": None})
                for account in settings.accounts
            ]
        }
    )

    def build(exchange: str) -> ExchangeAdapter:
        account = accounts.get(exchange)
        if account is None:
            raise ConfigurationError(f"no configured account on exchange {exchange!r} to ingest from", field="accounts")
        return adapter_for_account(public, account.name, **adapter_kwargs)

    return build


def ingest_from_settings(
    settings: MelticaSettings,
    *,
    last_bars: Mapping[str, datetime] | None = None,
    clock: Callable[[], datetime] | None = None,
    adapter_kwargs: Mapping[str, Any] | None = None,
) -> MarketDataIngest:
    """The deployment's :class:`MarketDataIngest` (not started). ``last_bars``: newest bar per market
    already on ``md.candles.1m``; ``adapter_kwargs`` override the adapters' (e.g. ``streams=``)."""
    # lazy: ccxt takes about a second to import; only a ccxt ingest needs it
    from meltica.adapters.ccxt.adapter import StreamPolicy

    problems = ingest_problems(settings)
    if problems:
        raise ConfigurationError("; ".join(problems), field="live.ingest")
    ingest = settings.live.ingest
    kwargs: dict[str, Any] = {"streams": StreamPolicy(stale_after=2 * ingest.stale_after_s)}
    kwargs.update(adapter_kwargs or {})
    extra: dict[str, Any] = {} if clock is None else {"clock": clock}
    return MarketDataIngest(
        public_adapter_factory(settings, **kwargs),
        subscriptions=ingest_subscriptions(settings),
        stale_after=ingest.stale_after_s,
        refetch_gaps=ingest.refetch_gaps,
        last_bars=last_bars,
        **extra,
    )
