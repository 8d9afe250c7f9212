"""Market data: reading recorded files, loading them into storage, reading them back at any timeframe."""
