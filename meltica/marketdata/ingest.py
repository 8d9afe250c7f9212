"""Historical ingestion: OHLCV bars and public trades from a venue adapter into the database.

Plain core (DESIGN.md §2): no Prefect here; ``flows/ingest.py`` gives these functions flow runs.

* **Paginated** — ``page_limit`` rows per venue call; the adapter keeps every call within the venue's
  rate limits (its per-account budget plus ccxt's ``enableRateLimit``) and maps failures into the
  error taxonomy, so a caller sees ``ExchangeUnavailableError``/``RateLimitError``, never ccxt.
* **Resuming** — a series restarts from the newest stored timestamp, not from ``start``.
* **Idempotent** — every page is COPY-loaded with ``ON CONFLICT DO NOTHING`` as soon as it arrives,
  so an interrupted run keeps its progress and a repeated run adds nothing.
* **Gaps** — :func:`find_gaps` lists the missing bar buckets of a stored series (SQL over
  ``candles``); :func:`ingest_ohlcv` checks the stored range after loading and refetches every gap
  (:func:`refetch_gaps`); what the venue cannot fill stays in the report as ``unfilled``.
* Only **closed** bars are stored (``ts + timeframe <= now``): a still-forming bar would otherwise be
  frozen in its partial state, because reloads never overwrite.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, text
from sqlalchemy.exc import InterfaceError, OperationalError

from meltica.adapters.base import ExchangeAdapter
from meltica.domain import Bar, Trade
from meltica.domain.market_data import CandleRow
from meltica.domain.timeframe import Timeframe
from meltica.errors import ConfigurationError
from meltica.storage import candles as candle_store
from meltica.storage import trades as trade_store
from meltica.storage.errors import classify_database_error

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
Now = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Gap:
    """Missing bars ``[start, end)`` of a stored series; ``missing`` bars of its timeframe."""

    start: datetime
    end: datetime
    missing: int

    def __str__(self) -> str:
        return f"{self.start.isoformat()} .. {self.end.isoformat()} ({self.missing} bars)"


@dataclass(frozen=True)
class IngestReport:
    """What one ingestion of one series did.

    ``fetched``: rows the venue returned in range (incl. refetches); ``inserted``: rows new to the
    database; ``pages``: venue calls; ``first``/``last``: the range fetched (None: nothing);
    ``gaps``: holes found in the stored series; ``refetched``: rows inserted into those holes;
    ``unfilled``: holes still open because the venue has no data there.
    """

    exchange: str
    symbol: str
    timeframe: str | None
    fetched: int
    inserted: int
    pages: int
    first: datetime | None
    last: datetime | None
    gaps: tuple[Gap, ...] = ()
    refetched: int = 0
    unfilled: tuple[Gap, ...] = field(default=())


@contextlib.contextmanager
def database_errors(engine: Engine) -> Iterator[None]:
    """A database that cannot be reached surfaces as ``InfrastructureUnavailableError`` (retryable), a refused
    login as ``AuthenticationError`` (terminal); either message keeps the server's reason."""
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        raise classify_database_error(exc, "ingestion", engine) or exc from None


def _timeframe(timeframe: str) -> Timeframe:
    try:
        return Timeframe.parse(timeframe)
    except ValueError as exc:
        raise ConfigurationError(str(exc), field="timeframe") from None


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _ceil(tf: Timeframe, ts: datetime) -> datetime:
    floored = tf.floor(ts)
    return floored if floored == ts else floored + tf.delta


# --- stored series ---------------------------------------------------------------------------


def stored_range(engine: Engine, exchange: str, symbol: str, timeframe: str) -> tuple[datetime | None, datetime | None]:
    """Open times of the oldest and the newest stored bar of a series."""
    with database_errors(engine), engine.connect() as conn:
        row = conn.execute(
            text("SELECT min(ts), max(ts) FROM candles WHERE exchange = :e AND symbol = :s AND timeframe = :tf"),
            {"e": exchange, "s": symbol, "tf": timeframe},
        ).one()
    return row[0], row[1]


_GAPS_SQL = """
WITH points AS (
    SELECT ts FROM candles
    WHERE exchange = :exchange AND symbol = :symbol AND timeframe = :timeframe AND ts >= :start AND ts < :end
    UNION ALL SELECT CAST(:start AS timestamptz) - CAST(:step AS interval)
    UNION ALL SELECT CAST(:end AS timestamptz)
), ordered AS (
    SELECT ts, lag(ts) OVER (ORDER BY ts) AS prev FROM points
)
SELECT prev + CAST(:step AS interval) AS gap_start, ts AS gap_end
FROM ordered WHERE prev IS NOT NULL AND ts - prev > CAST(:step AS interval)
ORDER BY gap_start
"""


def find_gaps(engine: Engine, exchange: str, symbol: str, timeframe: str, start: datetime, end: datetime) -> list[Gap]:
    """Missing bar buckets of the stored series in ``[start, end)``, as ranges (SQL over ``candles``).

    ``start`` is rounded up to the timeframe's bucket; a range with no stored bar at all is one gap.
    """
    tf = _timeframe(timeframe)
    lo, hi = _ceil(tf, _aware(start)), _ceil(tf, _aware(end))
    if hi <= lo:
        return []
    with database_errors(engine), engine.connect() as conn:
        rows = conn.execute(
            text(_GAPS_SQL),
            {"exchange": exchange, "symbol": symbol, "timeframe": tf.value, "start": lo, "end": hi, "step": tf.delta},
        ).all()
    return [Gap(start=r.gap_start, end=r.gap_end, missing=(r.gap_end - r.gap_start) // tf.delta) for r in rows]


# --- OHLCV -----------------------------------------------------------------------------------


@dataclass
class _Progress:
    fetched: int = 0
    inserted: int = 0
    pages: int = 0
    first: datetime | None = None
    last: datetime | None = None

    def saw(self, bars: Sequence[Bar]) -> None:
        self.fetched += len(bars)
        if bars:
            self.first = bars[0].ts if self.first is None else min(self.first, bars[0].ts)
            self.last = bars[-1].ts if self.last is None else max(self.last, bars[-1].ts)


def _store_bars(engine: Engine, bars: Sequence[Bar], exchange: str, symbol: str, tf: Timeframe) -> int:
    rows = [CandleRow(b.ts, b.open, b.high, b.low, b.close, b.volume, line=i) for i, b in enumerate(bars, 1)]
    with database_errors(engine):
        result = candle_store.load_candles(
            engine, rows, exchange=exchange, symbol=symbol, timeframe=tf.value, refresh_rollups=False
        )
    return result.inserted


async def _fetch_bars(
    adapter: ExchangeAdapter,
    engine: Engine,
    symbol: str,
    tf: Timeframe,
    since: datetime,
    until: datetime,
    page_limit: int,
    progress: _Progress,
) -> int:
    """Page through ``[since, until)`` and store each page; returns the rows inserted."""
    inserted = 0
    while since < until:
        page = await adapter.fetch_ohlcv(symbol, tf.value, since=since, limit=page_limit)
        progress.pages += 1
        bars = sorted((b for b in page if since <= b.ts < until), key=lambda b: b.ts)
        if not bars:
            break
        progress.saw(bars)
        inserted += _store_bars(engine, bars, adapter.exchange_id, symbol, tf)
        following = bars[-1].ts + tf.delta
        if following <= since or len(page) < page_limit:
            break  # the venue has nothing more (a short page is its last)
        since = following
    return inserted


async def refetch_gaps(
    adapter: ExchangeAdapter,
    engine: Engine,
    symbol: str,
    timeframe: str,
    gaps: Sequence[Gap],
    *,
    page_limit: int = 1000,
) -> IngestReport:
    """Fetch every gap's bars again and store them; ``unfilled`` lists what is still missing after."""
    tf = _timeframe(timeframe)
    progress = _Progress()
    inserted = 0
    unfilled: list[Gap] = []
    for gap in gaps:
        inserted += await _fetch_bars(adapter, engine, symbol, tf, gap.start, gap.end, page_limit, progress)
        unfilled.extend(find_gaps(engine, adapter.exchange_id, symbol, tf.value, gap.start, gap.end))
    return IngestReport(
        exchange=adapter.exchange_id,
        symbol=symbol,
        timeframe=tf.value,
        fetched=progress.fetched,
        inserted=inserted,
        pages=progress.pages,
        first=progress.first,
        last=progress.last,
        gaps=tuple(gaps),
        refetched=inserted,
        unfilled=tuple(unfilled),
    )


async def ingest_ohlcv(
    adapter: ExchangeAdapter,
    engine: Engine,
    symbol: str,
    timeframe: str,
    *,
    start: datetime | None,
    end: datetime | None = None,
    page_limit: int = 1000,
    refetch: bool = True,
    now: Now = _utc_now,
) -> IngestReport:
    """Load closed ``timeframe`` bars of ``symbol`` from ``start`` (None: the venue's first bar) to ``end``
    (None: now), resuming after the newest stored bar; then find gaps in the stored range from
    ``start`` on and, with ``refetch``, fetch them again.
    """
    if page_limit <= 0:
        raise ConfigurationError("page_limit must be positive", field="page_limit")
    tf = _timeframe(timeframe)
    exchange = adapter.exchange_id
    lower = _ceil(tf, _aware(start)) if start is not None else EPOCH
    closed_until = tf.floor(now()) if end is None else _ceil(tf, _aware(end))
    if end is not None:
        closed_until = min(closed_until, tf.floor(now()))
    first_stored, last_stored = stored_range(engine, exchange, symbol, tf.value)
    progress = _Progress()
    inserted = 0
    if start is not None and first_stored is not None and lower < first_stored and last_stored is not None:
        # An earlier ``start`` than before: the part in front of the stored series first.
        inserted += await _fetch_bars(
            adapter, engine, symbol, tf, lower, min(first_stored, closed_until), page_limit, progress
        )
    since = lower if last_stored is None or last_stored < lower else last_stored + tf.delta
    inserted += await _fetch_bars(adapter, engine, symbol, tf, since, closed_until, page_limit, progress)

    gaps: list[Gap] = []
    filled = 0
    unfilled: tuple[Gap, ...] = ()
    first_stored, last_stored = stored_range(engine, exchange, symbol, tf.value)
    if first_stored is not None and last_stored is not None:
        # Holes inside the stored series (before the first stored bar the venue may simply have none).
        check_from = max(lower, first_stored)
        gaps = find_gaps(engine, exchange, symbol, tf.value, check_from, last_stored + tf.delta)
        unfilled = tuple(gaps)
        if gaps and refetch:
            again = await refetch_gaps(adapter, engine, symbol, tf.value, gaps, page_limit=page_limit)
            progress.fetched += again.fetched
            progress.pages += again.pages
            filled, unfilled = again.refetched, again.unfilled
    if inserted or filled:
        with database_errors(engine):
            candle_store.refresh(engine, start=progress.first, end=progress.last)
    return IngestReport(
        exchange=exchange,
        symbol=symbol,
        timeframe=tf.value,
        fetched=progress.fetched,
        inserted=inserted + filled,
        pages=progress.pages,
        first=progress.first,
        last=progress.last,
        gaps=tuple(gaps),
        refetched=filled,
        unfilled=unfilled,
    )


# --- trades ----------------------------------------------------------------------------------


async def ingest_trades(
    adapter: ExchangeAdapter,
    engine: Engine,
    symbol: str,
    *,
    start: datetime | None,
    end: datetime | None = None,
    page_limit: int = 1000,
    max_pages: int | None = None,
) -> IngestReport:
    """Load public trades of ``symbol`` from ``start`` to ``end`` (None: as far as the venue has),
    resuming at the newest stored trade's time (inclusive: trades sharing that millisecond are
    deduplicated by their id, none is lost).

    A full page whose trades all share one timestamp cannot advance by time; the next page then starts
    a millisecond later (venues that page by time cannot do better).
    """
    if page_limit <= 0:
        raise ConfigurationError("page_limit must be positive", field="page_limit")
    exchange = adapter.exchange_id
    lower = _aware(start) if start is not None else EPOCH
    upper = _aware(end) if end is not None else None
    with database_errors(engine):
        stored = trade_store.last_trade_ts(engine, exchange, symbol)
    since = lower if stored is None or stored < lower else stored
    fetched = inserted = pages = 0
    first: datetime | None = None
    last: datetime | None = None
    while upper is None or since < upper:
        if max_pages is not None and pages >= max_pages:
            break
        page: list[Trade] = await adapter.fetch_trades(symbol, since=since, limit=page_limit)
        pages += 1
        batch = sorted((t for t in page if t.ts >= since and (upper is None or t.ts < upper)), key=lambda t: t.ts)
        if not batch:
            break
        fetched += len(batch)
        first = batch[0].ts if first is None else min(first, batch[0].ts)
        last = batch[-1].ts if last is None else max(last, batch[-1].ts)
        with database_errors(engine):
            inserted += trade_store.load_trades(engine, batch).inserted
        if len(page) < page_limit:
            break
        newest = batch[-1].ts
        since = newest if newest > since else since + timedelta(milliseconds=1)
    return IngestReport(
        exchange=exchange,
        symbol=symbol,
        timeframe=None,
        fetched=fetched,
        inserted=inserted,
        pages=pages,
        first=first,
        last=last,
    )
