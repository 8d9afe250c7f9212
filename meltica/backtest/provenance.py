"""What a run says about itself: its data's fingerprint, its rejections by reason, and loud warnings.

A backtest that did nothing is not a success: ``run_warnings`` names the runs a trader must not trust
at a glance (nothing traded, most orders rejected, impossible orders asked for), and every output
(the summary, ``metrics.json``, ``report.html``) shows them.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

MOST_REJECTED = 0.5
"""A run whose rejected share of orders is above this is warned about."""


class _OrderLike(Protocol):
    @property
    def status(self) -> str: ...

    @property
    def reason(self) -> str | None: ...


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (the data fingerprint of a run read from a file)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def series_sha256(columns: Sequence[Sequence[Any]]) -> str:
    """The SHA-256 of bar columns (time, open, high, low, close, volume), row by row as text: the
    fingerprint of bars that came from the database rather than a file."""
    digest = hashlib.sha256()
    for row in zip(*columns, strict=True):
        digest.update((",".join(str(v) for v in row) + "\n").encode())
    return digest.hexdigest()


def reason_code(reason: str | None) -> str:
    """``"MIN_NOTIONAL: Filter failure…"`` → ``"MIN_NOTIONAL"`` (the reason's code, before the colon)."""
    if not reason:
        return "UNKNOWN"
    return reason.split(":", 1)[0].strip() or "UNKNOWN"


def rejections_by_reason(orders: Iterable[_OrderLike]) -> dict[str, int]:
    """Rejected orders counted by reason code, most frequent first."""
    counts = Counter(reason_code(o.reason) for o in orders if o.status == "rejected")
    return dict(counts.most_common())


def run_warnings(
    *,
    orders: int,
    fills: int,
    rejections: Mapping[str, int],
    invalid_orders: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
    """What a trader must know before trusting the run's numbers (empty when nothing is wrong)."""
    warnings: list[str] = []
    rejected = sum(rejections.values())
    by_reason = ", ".join(f"{code} {n}" for code, n in rejections.items())
    if orders == 0 and fills == 0:
        warnings.append(
            "nothing traded: the strategy placed no orders (does it act on the data given? a strategy that "
            "trades on bars ignores --trades alone)"
        )
    elif fills == 0:
        warnings.append(f"nothing traded: {orders} order(s), none filled" + (f" ({by_reason})" if rejected else ""))
    if orders and rejected / orders > MOST_REJECTED:
        warnings.append(f"most orders were rejected: {rejected} of {orders} ({by_reason})")
    if invalid_orders:
        first = invalid_orders[0]
        warnings.append(
            f"the strategy asked for {len(invalid_orders)} impossible order(s), rejected as INVALID_INTENT "
            f"(first at {first['ts']}: {first['field']}={first['value']})"
        )
    return warnings
