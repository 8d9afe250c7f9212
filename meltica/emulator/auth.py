"""Request security as Binance defines it: API key header, HMAC-SHA256 signature, timing window.

``totalParams`` is the query string concatenated with the request body (no ``&`` in between), with
the ``signature`` parameter itself left out; the signature is the lower-case hex HMAC-SHA256 of it
under the account's secret (``rest-api.md`` → "SIGNED Endpoint security"). The WebSocket API signs
its ``params`` sorted by key and joined as ``k=v&…``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from meltica.emulator import errors

MAX_RECV_WINDOW_MS = 60_000
DEFAULT_RECV_WINDOW_MS = 5_000


def sign(payload: str, secret: str) -> str:
    return hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()


def strip_signature(raw: str) -> tuple[str, str | None]:
    """``raw`` (an url-encoded string) without its ``signature=`` part, and that signature."""
    if not raw:
        return "", None
    kept: list[str] = []
    signature: str | None = None
    for part in raw.split("&"):
        if part.startswith("signature="):
            signature = part[len("signature=") :]
        else:
            kept.append(part)
    return "&".join(kept), signature


def signed_payload(raw_query: str, raw_body: str) -> tuple[str, str | None]:
    """Binance's ``totalParams`` and the signature sent with the request (query or body)."""
    query, sig_q = strip_signature(raw_query)
    body, sig_b = strip_signature(raw_body)
    return query + body, sig_q or sig_b


def ws_payload(params: Mapping[str, object]) -> str:
    """The WebSocket API signature payload: every param but ``signature``, sorted by key."""
    parts = []
    for key in sorted(params):
        if key == "signature":
            continue
        value = params[key]
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        parts.append(f"{key}={text}")
    return "&".join(parts)


def check_api_key_format(api_key: str | None) -> str:
    if api_key is None or api_key == "":
        raise errors.bad_api_key_format()
    if len(api_key) > 256 or not api_key.isprintable():
        raise errors.bad_api_key_format()
    return api_key


def check_timing(timestamp: str | None, recv_window: str | None, server_ms: int) -> None:
    """Binance's rule: ``timestamp < serverTime + 1000`` and ``serverTime - timestamp <= recvWindow``."""
    if timestamp is None or timestamp == "":
        raise errors.mandatory_param("timestamp")
    try:
        ts = int(timestamp)
    except ValueError:
        raise errors.illegal_chars("timestamp") from None
    if ts > 10**14:  # microseconds are allowed too
        ts //= 1000
    window = DEFAULT_RECV_WINDOW_MS
    if recv_window not in (None, ""):
        try:
            window = int(float(str(recv_window)))
        except ValueError:
            raise errors.illegal_chars("recvWindow") from None
        if window > MAX_RECV_WINDOW_MS or window <= 0:
            raise errors.BinanceError(-1131, "recvWindow must be less than 60000")
    if ts >= server_ms + 1000:
        raise errors.timestamp_ahead()
    if server_ms - ts > window:
        raise errors.timestamp_outside_window()


def check_signature(payload: str, signature: str | None, secret: str) -> None:
    if signature is None or signature == "":
        raise errors.mandatory_param("signature")
    expected = sign(payload, secret)
    if not hmac.compare_digest(expected, signature.lower()):
        raise errors.invalid_signature()
