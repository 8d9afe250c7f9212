"""Persistence: SQLAlchemy tables, Alembic migrations, COPY loads, time-series SQL (DESIGN.md §6)."""
