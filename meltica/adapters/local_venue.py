"""How ccxt's ``binance`` classes are pointed at a Binance-compatible server on a local address (the
project's emulator, ``meltica.emulator``): the URLs and options. Kept in the adapter layer because the
adapter factory builds such venues from configuration (``AccountConfig.emulator_url``); the emulator
re-exports both."""

from __future__ import annotations

from typing import Any

# What ccxt 4.5.90's binance needs besides the URLs: spot markets only (the emulator serves no
# futures/options exchangeInfo). fetchCurrencies stays on: the emulator serves
# /sapi/v1/capital/config/getall.
CCXT_OPTIONS: dict[str, Any] = {"fetchMarkets": {"types": ["spot"]}}


def ccxt_urls_for(base_url: str) -> dict[str, Any]:
    """``exchange.urls['api']`` for ccxt's binance classes pointed at an emulator at ``base_url``
    (``http://127.0.0.1:PORT``; its websockets are the same host and port with ``ws://``)."""
    rest = base_url.rstrip("/")
    ws = "ws" + rest[len("http") :] if rest.startswith("http") else rest
    paths = {
        "sapi": "/sapi/v1",
        "sapiV2": "/sapi/v2",
        "sapiV3": "/sapi/v3",
        "sapiV4": "/sapi/v4",
        "dapiPublic": "/dapi/v1",
        "dapiPrivate": "/dapi/v1",
        "eapiPublic": "/eapi/v1",
        "eapiPrivate": "/eapi/v1",
        "dapiPrivateV2": "/dapi/v2",
        "dapiData": "/futures/data",
        "fapiPublic": "/fapi/v1",
        "fapiPublicV2": "/fapi/v2",
        "fapiPublicV3": "/fapi/v3",
        "fapiPrivate": "/fapi/v1",
        "fapiPrivateV2": "/fapi/v2",
        "fapiPrivateV3": "/fapi/v3",
        "fapiData": "/futures/data",
        "public": "/api/v3",
        "private": "/api/v3",
        "v1": "/api/v1",
        "papi": "/papi/v1",
        "papiV2": "/papi/v2",
    }
    urls: dict[str, Any] = {name: rest + path for name, path in paths.items()}
    urls["ws"] = {
        "spot": ws + "/ws",
        "margin": ws + "/ws",
        "linear": ws + "/fapi/ws",
        "inverse": ws + "/dapi/ws",
        "stock": ws + "/equity/ws",
        "option": ws + "/eoptions/public/ws",
        "optionMarket": ws + "/eoptions/market/ws",
        "optionPrivate": ws + "/eoptions/private/ws",
        "ws-api": {"spot": ws + "/ws-api/v3", "linear": ws + "/ws-fapi/v1", "inverse": ws + "/ws-dapi/v1"},
        "papi": ws + "/pm/ws",
    }
    return urls
