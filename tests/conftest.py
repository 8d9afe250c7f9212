"""Settings every test run shares. Servers are started by fixtures in tests/integration/conftest.py."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.session_topics import RUN_DIR, RUN_DIR_INPUT, delete_made, worker_id

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


# pytest-xdist (`-n` in addopts): the main process makes one folder for the run and hands it to every worker.
# Each worker gets its own Prefect home in it (profiles, local result storage, any ephemeral API database),
# so two workers never share a file there; servers, databases, topics and group ids are already per test
# (free ports, uuid names). Kafka topics the run made are deleted once, by the main process, at the end.


def pytest_configure(config: pytest.Config) -> None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        run = Path(tempfile.mkdtemp(prefix="meltica-test-run-"))
    else:
        run = Path(workerinput[RUN_DIR_INPUT])
    config.stash[RUN_DIR] = run
    home = run / f"prefect-home-{worker_id()}"
    home.mkdir(exist_ok=True)
    os.environ["PREFECT_HOME"] = str(home)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` (addopts): one worker per CPU this process may use. Measured on two loaded cores: a subset
    of integration tests took 241 s serially, 158 s on two workers and 133 s on three, but with three the
    whole suite starved stream workers past their 5 s event-loop watchdog and Prefect's SQLite past its lock
    timeout (503s), so not more workers than CPUs. ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still sets the number."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return len(os.sched_getaffinity(0))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: object) -> None:  # xdist's hook: runs in the main process, once per worker
    node.workerinput[RUN_DIR_INPUT] = str(node.config.stash[RUN_DIR])  # type: ignore[attr-defined]


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the main process, after every worker has finished
        done = delete_made(session.config.stash[RUN_DIR])
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if done and reporter is not None:
            reporter.write("\n")  # xdist's progress line does not end where ensure_newline would see it
            reporter.write_line(f"meltica: {done}")


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and RUN_DIR in config.stash:
        shutil.rmtree(config.stash[RUN_DIR], ignore_errors=True)
