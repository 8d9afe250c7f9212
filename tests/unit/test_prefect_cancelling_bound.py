"""The bound on a cancel nobody confirms (a run cancelled after its host died): `meltica flows server` sets
Prefect's cancellation-cleanup timeout, and `meltica flows deploy` warns about a server whose bound is longer
or off (read from the server's `GET /admin/settings`)."""

from __future__ import annotations

from meltica.infra.prefect import (
    CANCELLING_TIMEOUT_SECONDS,
    cancelling_timeout_warning,
    server_environment,
)

ENV = "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_CANCELLING_TIMEOUT_SECONDS"


def _settings(**cleanup: object) -> dict[str, object]:
    return {"server": {"services": {"cancellation_cleanup": cleanup}}}


def test_flows_server_bounds_cancelling_unless_the_operator_chose() -> None:
    env = server_environment({"PATH": "/bin"})
    assert env[ENV] == str(CANCELLING_TIMEOUT_SECONDS) == "90"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and env["PATH"] == "/bin"
    assert server_environment({ENV: "45"})[ENV] == "45"


def test_deploy_warns_about_a_server_that_leaves_cancels_hanging() -> None:
    assert cancelling_timeout_warning(_settings(enabled=True, cancelling_timeout_seconds=90.0)) is None
    assert cancelling_timeout_warning(_settings(enabled=True, cancelling_timeout_seconds=30.0)) is None
    longer = cancelling_timeout_warning(_settings(enabled=True, cancelling_timeout_seconds=300.0))
    assert longer is not None and "after 300 s" in longer and f"{ENV}=90" in longer
    off = cancelling_timeout_warning(_settings(enabled=False, cancelling_timeout_seconds=90.0))
    assert off is not None and "off" in off
    assert cancelling_timeout_warning({}) is None  # a server that does not say: nothing to claim
