"""Request signing as Binance documents it (rest-api.md, "SIGNED Endpoint Examples")."""

from __future__ import annotations

import pytest

from meltica.emulator import auth
from meltica.emulator.errors import BinanceError
from meltica.emulator.faults import Faults

DOC_SECRET = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"
DOC_QUERY = "&".join(
    [
        "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC",
        "quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559",
    ]
)
DOC_SIGNATURE = "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"


def test_documented_signature() -> None:
    assert auth.sign(DOC_QUERY, DOC_SECRET) == DOC_SIGNATURE


def test_query_and_body_are_concatenated_without_separator() -> None:
    payload, sig = auth.signed_payload("symbol=LTCBTC&side=BUY", f"type=LIMIT&signature={DOC_SIGNATURE}")
    assert payload == "symbol=LTCBTC&side=BUYtype=LIMIT" and sig == DOC_SIGNATURE


def test_bad_signature_and_timing() -> None:
    with pytest.raises(BinanceError) as exc:
        auth.check_signature(DOC_QUERY, "0" * 64, DOC_SECRET)
    assert exc.value.code == -1022
    with pytest.raises(BinanceError) as exc:
        auth.check_timing("1000", None, 100_000)
    assert exc.value.code == -1021
    with pytest.raises(BinanceError) as exc:
        auth.check_timing("102000", None, 100_000)
    assert exc.value.code == -1021
    auth.check_timing("99000", "5000", 100_000)


def test_fault_knobs_update_and_consume() -> None:
    faults = Faults()
    faults.update({"fail_next": 2, "latency_ms": 5})
    assert faults.take("fail_next") and faults.take("fail_next") and not faults.take("fail_next")
    with pytest.raises(KeyError):
        faults.update({"nope": 1})
