"""Meltica: the trading core. Plain Python — no Kafka and no Prefect imports here (DESIGN.md §2)."""

__version__ = "0.1.0"
