"""Time-series SQL for both database flavours, in one module (DESIGN.md §6).

TimescaleDB is detected at runtime:

* present  -> time-series tables become hypertables with compression and retention policies, and
  ``candles_1h`` is a continuous aggregate refreshed by a policy;
* absent   -> plain PostgreSQL: the same tables stay ordinary tables, ``candles_1h`` is a
  materialized view (refreshed after loads), and roll-ups use ``date_bin``.

Queries above this module never branch on the flavour: they call :func:`rollup_candles_sql` and
:func:`refresh_candle_rollups`, which pick the right SQL.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, text

from meltica.errors import ConfigurationError, DataValidationError


class Flavour(enum.StrEnum):
    POSTGRES = "postgresql"
    TIMESCALEDB = "timescaledb"


@dataclass(frozen=True)
class HypertableSpec:
    table: str
    chunk_interval: str
    segment_by: tuple[str, ...]
    order_by: str
    compress_after: str
    # None keeps data forever (candles are small and are the backtests' input).
    retain_for: str | None


HYPERTABLES: tuple[HypertableSpec, ...] = (
    HypertableSpec("candles", "7 days", ("exchange", "symbol", "timeframe"), "ts DESC", "30 days", None),
    HypertableSpec("trades", "1 day", ("exchange", "symbol"), "ts DESC", "7 days", "365 days"),
    HypertableSpec("order_book_snapshots", "1 day", ("exchange", "symbol"), "ts DESC", "3 days", "90 days"),
    HypertableSpec("position_snapshots", "7 days", ("account", "exchange"), "ts DESC", "30 days", None),
    HypertableSpec("balance_snapshots", "7 days", ("account", "exchange"), "ts DESC", "30 days", None),
)

# date_bin needs an origin. TimescaleDB's time_bucket uses Monday 2000-01-03 00:00 UTC; using the same one
# gives both paths identical buckets: days start at midnight, weeks on Monday (as venues' weekly candles).
BUCKET_ORIGIN = "TIMESTAMPTZ '2000-01-03 00:00:00+00'"

CANDLES_1H_VIEW = "candles_1h"
# The owner's function that refreshes CANDLES_1H_VIEW on plain PostgreSQL (migration 0007).
REFRESH_CANDLES_FUNCTION = "meltica_refresh_candles_1h"


def timescaledb_available(conn: Connection) -> bool:
    """True when the server can load TimescaleDB (installed or installable in this database)."""
    return bool(
        conn.execute(text("SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')")).scalar()
    )


def detect_flavour(conn: Connection) -> Flavour:
    """TimescaleDB when its extension is installed in this database, plain PostgreSQL otherwise."""
    installed = conn.execute(text("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')")).scalar()
    return Flavour.TIMESCALEDB if installed else Flavour.POSTGRES


def bucket_expression(flavour: Flavour, width: timedelta, column: str = "ts") -> str:
    interval = _interval_literal(width)
    if flavour is Flavour.TIMESCALEDB:
        return f"time_bucket({interval}, {column})"
    return f"date_bin({interval}, {column}, {BUCKET_ORIGIN})"


def _first_last(flavour: Flavour) -> tuple[str, str]:
    if flavour is Flavour.TIMESCALEDB:
        return "first(open, ts)", "last(close, ts)"
    return "(array_agg(open ORDER BY ts ASC))[1]", "(array_agg(close ORDER BY ts DESC))[1]"


def _interval_literal(width: timedelta) -> str:
    seconds = int(width.total_seconds())
    if seconds <= 0 or width != timedelta(seconds=seconds):
        raise DataValidationError(f"bucket width must be a positive whole number of seconds, got {width}")
    return f"INTERVAL '{seconds} seconds'"


def _rollup_select(flavour: Flavour, width: timedelta, where: str) -> str:
    first_open, last_close = _first_last(flavour)
    bucket = bucket_expression(flavour, width)
    return f"""
        SELECT exchange, symbol, {bucket} AS ts,
               {first_open} AS open, max(high) AS high, min(low) AS low, {last_close} AS close,
               sum(volume) AS volume, count(*) AS bar_count
        FROM candles
        WHERE {where}
        GROUP BY exchange, symbol, {bucket}
    """


# --- install / uninstall ---------------------------------------------------------------------


def install(conn: Connection, *, use_timescaledb: bool | None = None) -> Flavour:
    """Set up the flavour-specific objects. Called by the migrations; idempotent.

    ``use_timescaledb=None`` means: use it when the server has it.
    """
    if use_timescaledb is None:
        use_timescaledb = timescaledb_available(conn)
    if use_timescaledb:
        if detect_flavour(conn) is not Flavour.TIMESCALEDB:
            _create_timescaledb_extension(conn)
        _install_timescaledb(conn)
        return Flavour.TIMESCALEDB
    _install_postgres(conn)
    return Flavour.POSTGRES


def uninstall(conn: Connection) -> None:
    """Drop the flavour-specific objects (the tables themselves belong to the migrations)."""
    flavour = detect_flavour(conn)
    if flavour is Flavour.TIMESCALEDB:
        conn.execute(text(f"DROP MATERIALIZED VIEW IF EXISTS {CANDLES_1H_VIEW} CASCADE"))
        for spec in HYPERTABLES:
            conn.execute(text("SELECT remove_retention_policy(:t, if_exists => true)"), {"t": spec.table})
            conn.execute(text("SELECT remove_compression_policy(:t, if_exists => true)"), {"t": spec.table})
    else:
        conn.execute(text(f"DROP MATERIALIZED VIEW IF EXISTS {CANDLES_1H_VIEW}"))


def _create_timescaledb_extension(conn: Connection) -> None:
    """Only a superuser may create the (untrusted) extension; the owner role that runs the migrations is not
    one (meltica.storage.privileges): an administrator installs it first, as ``meltica infra up`` does
    locally (in ``template1`` too, so every new database has it)."""
    superuser = conn.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar()
    if not superuser:
        database = conn.execute(text("SELECT current_database()")).scalar()
        raise ConfigurationError(
            f"TimescaleDB is available on this server but not installed in database {database!r}, and the "
            "migrating role may not install it: as a superuser run CREATE EXTENSION timescaledb in that "
            "database (and in template1 for databases created later), then migrate again",
            field="database_migration_url",
        )
    conn.execute(text("CREATE EXTENSION IF NOT EXISTS timescaledb"))


def _install_postgres(conn: Connection) -> None:
    conn.execute(
        text(
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {CANDLES_1H_VIEW} AS "
            + _rollup_select(Flavour.POSTGRES, timedelta(hours=1), "timeframe = '1m'")
            + " WITH NO DATA"
        )
    )
    # A unique index lets REFRESH ... CONCURRENTLY keep the view readable during refreshes.
    conn.execute(
        text(f"CREATE UNIQUE INDEX IF NOT EXISTS ux_{CANDLES_1H_VIEW} ON {CANDLES_1H_VIEW} (exchange, symbol, ts)")
    )
    conn.execute(text(f"REFRESH MATERIALIZED VIEW {CANDLES_1H_VIEW}"))


def _install_timescaledb(conn: Connection) -> None:
    for spec in HYPERTABLES:
        conn.execute(
            text(
                "SELECT create_hypertable(CAST(:t AS regclass), by_range('ts', CAST(:chunk AS interval)), "
                "if_not_exists => true, migrate_data => true)"
            ),
            {"t": spec.table, "chunk": spec.chunk_interval},
        )
        segment_by = ", ".join(spec.segment_by)
        conn.execute(
            text(
                f"ALTER TABLE {spec.table} SET (timescaledb.compress, "
                f"timescaledb.compress_segmentby = '{segment_by}', "
                f"timescaledb.compress_orderby = '{spec.order_by}')"
            )
        )
        conn.execute(
            text(
                "SELECT add_compression_policy(CAST(:t AS regclass), CAST(:after AS interval), if_not_exists => true)"
            ),
            {"t": spec.table, "after": spec.compress_after},
        )
        if spec.retain_for is not None:
            conn.execute(
                text(
                    "SELECT add_retention_policy(CAST(:t AS regclass), CAST(:keep AS interval), if_not_exists => true)"
                ),
                {"t": spec.table, "keep": spec.retain_for},
            )
    conn.execute(
        text(
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {CANDLES_1H_VIEW} WITH (timescaledb.continuous) AS "
            + _rollup_select(Flavour.TIMESCALEDB, timedelta(hours=1), "timeframe = '1m'")
            + " WITH NO DATA"
        )
    )
    conn.execute(
        text(
            f"SELECT add_continuous_aggregate_policy('{CANDLES_1H_VIEW}', start_offset => INTERVAL '3 days', "
            "end_offset => INTERVAL '1 hour', schedule_interval => INTERVAL '15 minutes', if_not_exists => true)"
        )
    )


# --- reading and refreshing ------------------------------------------------------------------


def refresh_candle_rollups(conn: Connection, *, start: datetime | None = None, end: datetime | None = None) -> None:
    """Bring ``candles_1h`` up to date after a load.

    On TimescaleDB ``refresh_continuous_aggregate`` cannot run inside a transaction block, so
    ``conn`` must be in autocommit mode there.
    """
    flavour = detect_flavour(conn)
    if flavour is Flavour.TIMESCALEDB:
        # Only the aggregate's owner may refresh it. The runtime role (meltica.storage.privileges) leaves it
        # to the refresh policy; reads aggregate in real time what is not materialized yet (0007).
        if conn.execute(
            text("SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class WHERE oid = CAST(:v AS regclass)"),
            {"v": CANDLES_1H_VIEW},
        ).scalar():
            conn.execute(
                text(f"CALL refresh_continuous_aggregate('{CANDLES_1H_VIEW}', :start, :end)"),
                {"start": start, "end": end},
            )
    elif conn.execute(text(f"SELECT to_regprocedure('{REFRESH_CANDLES_FUNCTION}()') IS NOT NULL")).scalar():
        # The owner's SECURITY DEFINER function (0007): REFRESH needs the owner, the runtime role calls this.
        conn.execute(text(f"SELECT {REFRESH_CANDLES_FUNCTION}()"))
    else:
        populated = conn.execute(
            text("SELECT ispopulated FROM pg_matviews WHERE matviewname = :v"), {"v": CANDLES_1H_VIEW}
        ).scalar()
        concurrently = "CONCURRENTLY " if populated else ""
        conn.execute(text(f"REFRESH MATERIALIZED VIEW {concurrently}{CANDLES_1H_VIEW}"))


def rollup_candles_sql(flavour: Flavour, width: timedelta) -> str:
    """SQL rolling stored 1-timeframe candles up to buckets of ``width``.

    Bind parameters: ``exchange``, ``symbol``, ``timeframe`` (the stored one), ``start``, ``end``
    (half-open ``[start, end)``, either may be NULL).
    """
    where = (
        "exchange = :exchange AND symbol = :symbol AND timeframe = :timeframe "
        "AND (CAST(:start AS timestamptz) IS NULL OR ts >= :start) "
        "AND (CAST(:end AS timestamptz) IS NULL OR ts < :end)"
    )
    return _rollup_select(flavour, width, where) + " ORDER BY ts"


def candles_1h_view_sql() -> str:
    """Read the maintained 1-hour roll-up (continuous aggregate or materialized view)."""
    return (
        f"SELECT exchange, symbol, ts, open, high, low, close, volume, bar_count FROM {CANDLES_1H_VIEW} "
        "WHERE exchange = :exchange AND symbol = :symbol "
        "AND (CAST(:start AS timestamptz) IS NULL OR ts >= :start) "
        "AND (CAST(:end AS timestamptz) IS NULL OR ts < :end) ORDER BY ts"
    )
