"""Engine creation and database-level helpers."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.engine import URL

from meltica.errors import ConfigurationError


def normalise_url(url: str | URL) -> URL:
    """Accept ``postgresql://`` / ``postgres://`` URLs and pin the psycopg 3 driver."""
    try:
        parsed = make_url(str(url)) if not isinstance(url, URL) else url
    except Exception as exc:  # sqlalchemy raises ArgumentError with the URL inside: don't echo it
        raise ConfigurationError("database URL is not a valid URL", field="database_url") from exc
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise ConfigurationError(
            f"database URL must be PostgreSQL, got {parsed.get_backend_name()!r}", field="database_url"
        )
    return parsed.set(drivername="postgresql+psycopg")


def masked(url: str | URL) -> str:
    """The URL with its password hidden, for logs and status output."""
    return normalise_url(url).render_as_string(hide_password=True)


def make_engine(url: str | URL, *, echo: bool = False) -> Engine:
    return create_engine(
        normalise_url(url),
        echo=echo,
        pool_pre_ping=True,
        # Every session speaks UTC, whatever the server's default (DESIGN.md §4).
        connect_args={"options": "-c timezone=UTC"},
    )
