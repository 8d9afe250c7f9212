"""Settings every test run shares. Servers are started by fixtures in tests/integration/conftest.py."""

from __future__ import annotations

import os

# Prefect: no telemetry (it also causes "database is locked" errors on the ephemeral API), and no
# warning for loggers used outside a flow run (STACK-NOTES.md).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("PREFECT_UI_ENABLED", "false")
