"""Settings every test run shares. Servers are started by fixtures in tests/integration/conftest.py."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Prefect: no telemetry (it also causes "database is locked" errors on the ephemeral API), and no
# warning for loggers used outside a flow run (STACK-NOTES.md).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("PREFECT_UI_ENABLED", "false")

# Hypothesis profiles. In CI (the CI environment variable set, as every CI service does) examples are
# derandomised — the same on every run, so a failure there reproduces anywhere with CI=1 — and no example
# database is written. Locally the default profile explores new examples and remembers failing ones in
# .hypothesis/. HYPOTHESIS_PROFILE picks a profile explicitly.
settings.register_profile(
    "ci", derandomize=True, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev")
_ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if _ci else "dev"))
