"""Time-series SQL for both database flavours, in one module (DESIGN.md §6).

At migration time (:func:`install`) TimescaleDB is used when the server can really run it (the extension
is available *and* preloaded through ``shared_preload_libraries``):

* TimescaleDB -> time-series tables become hypertables with compression policies (retention only where
  configured: :func:`apply_retention`), and ``candles_1h`` is a continuous aggregate with real-time
  aggregation, refreshed after loads and by a policy;
* plain PostgreSQL -> the same tables stay ordinary tables, ``candles_1h`` is a materialized view
  (refreshed after loads), and roll-ups use ``date_bin``.

Afterwards the flavour is what the database's objects *are* (:func:`detect_flavour`): a database
migrated on plain PostgreSQL that later gets ``CREATE EXTENSION timescaledb`` stays on the plain path
(its ``candles_1h`` is a materialized view, not a continuous aggregate). A TimescaleDB older than
:data:`TIMESCALEDB_MINIMUM` is refused (:func:`check_timescaledb_version`).

Queries above this module never branch on the flavour: they call :func:`rollup_candles_sql` and
:func:`refresh_candle_rollups`, which pick the right SQL.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, text

from meltica.errors import ConfigurationError, DataValidationError, InfrastructureError

log = logging.getLogger(__name__)

TIMESCALEDB_MINIMUM: tuple[int, int, int] = (2, 18, 1)
"""Oldest TimescaleDB Meltica runs on. Below 2.18.1, ``INSERT … SELECT … ON CONFLICT DO NOTHING`` (the load
statement) into compressed chunks silently drops rows (fixed upstream in 2.18.1). The tested production pin
is 2.28.3 (``infra/compose.yaml``)."""


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


# No retention here: TimescaleDB's retention counts from *now*, so a default window would delete backfilled
# history on the first policy run. Retention is opt-in per table (``storage.retention``, apply_retention).
HYPERTABLES: tuple[HypertableSpec, ...] = (
    HypertableSpec("candles", "7 days", ("exchange", "symbol", "timeframe"), "ts DESC", "30 days"),
    HypertableSpec("trades", "1 day", ("exchange", "symbol"), "ts DESC", "7 days"),
    HypertableSpec("order_book_snapshots", "1 day", ("exchange", "symbol"), "ts DESC", "3 days"),
    HypertableSpec("position_snapshots", "7 days", ("account", "exchange"), "ts DESC", "30 days"),
    HypertableSpec("balance_snapshots", "7 days", ("account", "exchange"), "ts DESC", "30 days"),
)
RETENTION_TABLES: tuple[str, ...] = tuple(spec.table for spec in HYPERTABLES)

# date_bin needs an origin. TimescaleDB's time_bucket uses Monday 2000-01-03 00:00 UTC; using the same one
# gives both paths identical buckets: days start at midnight, weeks on Monday (as venues' weekly candles).
BUCKET_ORIGIN = "TIMESTAMPTZ '2000-01-03 00:00:00+00'"

CANDLES_1H_VIEW = "candles_1h"
# The refresh policy covers the whole history (start_offset NULL): a refresh only recomputes invalidated
# hours, so a backfill by a role that may not refresh the aggregate itself is materialised at the next run.
CANDLES_1H_POLICY = "start_offset => NULL, end_offset => INTERVAL '1 hour', schedule_interval => INTERVAL '15 minutes'"
# The owner's function that refreshes CANDLES_1H_VIEW on plain PostgreSQL (migration 0007).
REFRESH_CANDLES_FUNCTION = "meltica_refresh_candles_1h"


def timescaledb_packaged(conn: Connection) -> bool:
    """True when the server has TimescaleDB's extension files (installed or installable here)."""
    return bool(
        conn.execute(text("SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')")).scalar()
    )


def preload_list_has_timescaledb(shared_preload_libraries: str) -> bool:
    """Whether a ``shared_preload_libraries`` value loads TimescaleDB (``timescaledb``, ``$libdir/timescaledb``,
    quoted or not, among others)."""
    for entry in shared_preload_libraries.split(","):
        name = entry.strip().strip('"').rsplit("/", 1)[-1]
        if name == "timescaledb" or name.startswith("timescaledb-"):
            return True
    return False


def timescaledb_preloaded(conn: Connection) -> bool:
    """True when the server preloads TimescaleDB (without it ``CREATE EXTENSION timescaledb`` fails).

    ``shared_preload_libraries`` is hidden from roles without ``pg_read_all_settings``; then the loader's own
    setting ``timescaledb.max_background_workers`` (defined only when the library is preloaded) decides."""
    rows: dict[str, str | None] = {
        str(name): setting
        for name, setting in conn.execute(
            text(
                "SELECT name, setting FROM pg_settings "
                "WHERE name IN ('shared_preload_libraries', 'timescaledb.max_background_workers')"
            )
        ).all()
    }
    if "shared_preload_libraries" in rows:
        return preload_list_has_timescaledb(str(rows["shared_preload_libraries"] or ""))
    return "timescaledb.max_background_workers" in rows


def timescaledb_available(conn: Connection) -> bool:
    """True when the server can run TimescaleDB: the extension is packaged *and* preloaded."""
    return timescaledb_packaged(conn) and timescaledb_preloaded(conn)


def parse_version(version: str) -> tuple[int, ...]:
    """``"2.17.2"`` → ``(2, 17, 2)``; a suffix such as ``-dev`` is ignored; no leading number → ``()``."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def check_timescaledb_version(version: str) -> None:
    """Refuse a TimescaleDB older than :data:`TIMESCALEDB_MINIMUM` (one line, no data touched)."""
    if parse_version(version) < TIMESCALEDB_MINIMUM:
        minimum = ".".join(map(str, TIMESCALEDB_MINIMUM))
        raise InfrastructureError(
            f"TimescaleDB {version} is older than {minimum}, the oldest Meltica runs on (below it, reloads into "
            f"compressed chunks silently lose rows): upgrade the server's package, then run "
            f"ALTER EXTENSION timescaledb UPDATE in this database"
        )


def decide_flavour(extension_version: str | None, candles_1h_is_continuous: bool) -> Flavour:
    """The flavour of a database from what it holds: TimescaleDB only when the extension is installed *and*
    ``candles_1h`` is its continuous aggregate (the objects were made by the TimescaleDB path)."""
    if extension_version is None or not candles_1h_is_continuous:
        return Flavour.POSTGRES
    check_timescaledb_version(extension_version)
    return Flavour.TIMESCALEDB


def _installed_version(conn: Connection) -> str | None:
    version = conn.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")).scalar()
    return None if version is None else str(version)


def detect_flavour(conn: Connection) -> Flavour:
    """The flavour the database's time-series objects were created for (see :func:`decide_flavour`)."""
    version = conn.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")).scalar()
    if version is None:
        return Flavour.POSTGRES
    continuous = bool(
        conn.execute(
            text(
                "SELECT EXISTS (SELECT 1 FROM timescaledb_information.continuous_aggregates "
                "WHERE view_name = :v AND view_schema = current_schema())"
            ),
            {"v": CANDLES_1H_VIEW},
        ).scalar()
    )
    return decide_flavour(str(version), continuous)


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
        if not use_timescaledb and timescaledb_packaged(conn):
            log.warning(
                "TimescaleDB is installed on this server but not preloaded (shared_preload_libraries): "
                "the time-series tables are created for plain PostgreSQL"
            )
    if use_timescaledb:
        version = _installed_version(conn)
        if version is None:
            _create_timescaledb_extension(conn)
            version = _installed_version(conn)
        check_timescaledb_version(str(version))
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
    # materialized_only = false: real-time aggregation, so the newest (not yet materialised) hour is read
    # from the 1m rows instead of missing until the next refresh.
    conn.execute(
        text(
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {CANDLES_1H_VIEW} "
            "WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS "
            + _rollup_select(Flavour.TIMESCALEDB, timedelta(hours=1), "timeframe = '1m'")
            + " WITH NO DATA"
        )
    )
    conn.execute(
        text(f"SELECT add_continuous_aggregate_policy('{CANDLES_1H_VIEW}', {CANDLES_1H_POLICY}, if_not_exists => true)")
    )


# --- reading and refreshing ------------------------------------------------------------------


def set_realtime_aggregation(conn: Connection) -> None:
    """Turn on real-time aggregation of ``candles_1h`` (TimescaleDB path only; a no-op elsewhere)."""
    if detect_flavour(conn) is Flavour.TIMESCALEDB:
        conn.execute(text(f"ALTER MATERIALIZED VIEW {CANDLES_1H_VIEW} SET (timescaledb.materialized_only = false)"))


def hour_window(start: datetime | None, end: datetime | None) -> tuple[datetime | None, datetime | None]:
    """The refresh window covering every hour a load touched: from the hour of its first bar to the end of the
    hour of its last (a continuous-aggregate refresh materialises only buckets wholly inside its window, and
    refuses a window smaller than one bucket). ``None`` stays open-ended."""
    hour = timedelta(hours=1)

    def floor(ts: datetime) -> datetime:
        aware = ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
        return aware.astimezone(UTC).replace(minute=0, second=0, microsecond=0)

    return (
        floor(start) if start is not None else None,
        floor(end) + hour if end is not None else None,
    )


def refresh_candle_rollups(conn: Connection, *, start: datetime | None = None, end: datetime | None = None) -> bool:
    """Bring ``candles_1h`` up to date after a load of bars from ``start`` to ``end`` (the first and last bar
    times; ``None``: open-ended). False when this role may not refresh it (TimescaleDB, not the owner): the
    policy will.

    On TimescaleDB ``refresh_continuous_aggregate`` cannot run inside a transaction block, so
    ``conn`` must be in autocommit mode there.
    """
    flavour = detect_flavour(conn)
    if flavour is Flavour.TIMESCALEDB:
        # Only the aggregate's owner may refresh it (and not from inside a function). Another role (the
        # runtime role, meltica.storage.privileges) leaves it to the refresh policy, which materialises every
        # invalidated hour, while reads aggregate in real time what is newer than the materialised part.
        if not conn.execute(
            text("SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class WHERE oid = CAST(:v AS regclass)"),
            {"v": CANDLES_1H_VIEW},
        ).scalar():
            return False
        window_start, window_end = hour_window(start, end)
        # Typed bounds: with an untyped NULL the server cannot infer the parameter's type.
        conn.execute(
            text(
                f"CALL refresh_continuous_aggregate('{CANDLES_1H_VIEW}', "
                "CAST(:start AS timestamptz), CAST(:end AS timestamptz))"
            ),
            {"start": window_start, "end": window_end},
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
    return True


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


# --- retention (opt-in) ----------------------------------------------------------------------


def retention_problems(retention: Mapping[str, str]) -> list[str]:
    """What is wrong with a ``storage.retention`` mapping (table → interval), each naming the table."""
    problems = []
    for table in retention:
        if table not in RETENTION_TABLES:
            tables = ", ".join(RETENTION_TABLES)
            problems.append(f"storage.retention.{table}: not a time-series table (one of {tables})")
    return problems


def apply_retention(conn: Connection, retention: Mapping[str, str]) -> list[str]:
    """Make TimescaleDB's retention policies exactly ``retention`` (table → interval such as ``"365 days"``):
    a policy is added or replaced for each listed table and removed from every other one. Returns one line
    per action (for the operator). On plain PostgreSQL nothing is deleted, ever: a configured retention is
    reported as not enforced."""
    problems = retention_problems(retention)
    if problems:
        raise DataValidationError("; ".join(problems), reason="bad_retention")
    if detect_flavour(conn) is not Flavour.TIMESCALEDB:
        return [
            f"retention of {table} ({keep}) is not enforced: plain PostgreSQL keeps every row"
            for table, keep in sorted(retention.items())
        ]
    actions = []
    current: dict[str, str] = {
        str(table): str(drop_after)
        for table, drop_after in conn.execute(
            text(
                "SELECT hypertable_name, config ->> 'drop_after' FROM timescaledb_information.jobs "
                "WHERE proc_name = 'policy_retention' AND hypertable_schema = current_schema()"
            )
        ).all()
    }
    remove = text("SELECT remove_retention_policy(CAST(:t AS regclass), if_exists => true)")
    for table in RETENTION_TABLES:
        wanted = retention.get(table)
        existing = current.get(table)
        if wanted is None:
            if existing is not None:
                conn.execute(remove, {"t": table})
                actions.append(f"retention of {table} removed (was {existing})")
            continue
        same = existing is not None and bool(
            conn.execute(
                text("SELECT CAST(:a AS interval) = CAST(:b AS interval)"), {"a": existing, "b": wanted}
            ).scalar()
        )
        if same:
            continue
        if existing is not None:
            conn.execute(remove, {"t": table})
        conn.execute(
            text("SELECT add_retention_policy(CAST(:t AS regclass), CAST(:keep AS interval))"),
            {"t": table, "keep": wanted},
        )
        actions.append(f"retention of {table}: chunks older than {wanted} are dropped")
    return actions
