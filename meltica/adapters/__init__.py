"""Venue adapters: the Connection layer. Nothing above this package imports ccxt (DESIGN.md §5)."""
