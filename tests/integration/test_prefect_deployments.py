"""End to end on a real `prefect server` on loopback: `meltica flows deploy` creates the deployments of
prefect.yaml, a worker on the `meltica` process pool picks up an on-demand reconciliation triggered by
`meltica reconcile --now --watch`, and the flow run completes.

Everything runs as separate processes, as an operator would run them; the server's database and the
client profile live in a temporary PREFECT_HOME.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))

# Every deployment of prefect.yaml, as `flow/deployment`.
EXPECTED_DEPLOYMENTS = {
    "ingest/hourly",
    "daily-risk-report/daily",
    "reconcile/every-15-minutes",
    "reconcile/now",
    "backtest/run-backtest",
    "backtest-sweep/run-sweep",
    "import-candle-file/import-file",
}

# The parameters without a default, per on-demand deployment.
REQUIRED: dict[str, dict[str, Any]] = {
    "backtest/run-backtest": {"strategy": "momentum"},
    "backtest-sweep/run-sweep": {"strategy": "momentum", "grid_space": {"fast": [5, 10]}},
    "import-candle-file/import-file": {
        "path": "bars.csv",
        "exchange": "binance",
        "symbol": "BTC/USDT",
        "timeframe": "1m",
    },
}


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback test server
        return json.loads(resp.read())


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(  # noqa: S310 - loopback test server
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
        return json.loads(resp.read())


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@pytest.fixture
def prefect_env(tmp_path: Path, fresh_database: Engine) -> dict[str, str]:
    """Environment for every process of the test: an isolated PREFECT_HOME and the fresh database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_LOGGING_LEVEL="INFO",
        MELTICA_DATABASE_URL=fresh_database.url.render_as_string(hide_password=False),
    )
    return env


@pytest.fixture
def prefect_server(prefect_env: dict[str, str], free_port: Callable[[], int], tmp_path: Path) -> Iterator[str]:
    """A real `prefect server start` on 127.0.0.1; yields its API URL once /api/health answers."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=prefect_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"prefect server exited:\n{_tail(log)}"
            try:
                if _get(api + "/health") is True:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prefect server not healthy after 60 s:\n{_tail(log)}"
            time.sleep(0.5)
        prefect_env["PREFECT_API_URL"] = api
        yield api
    finally:
        _stop(proc)


def _meltica(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meltica", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def emulator_config(prefect_env: dict[str, str], free_port: Callable[[], int], tmp_path: Path) -> Iterator[Path]:
    """A Binance emulator process and a configuration file whose one account, `emu`, trades on it."""
    port = free_port()
    emulator = [sys.executable, "-m", "meltica", "emulator", "binance", "--port", str(port)]
    key, secret = "flows-key-0123456789", "flows-secret-abcdef-987654"
    log = tmp_path / "emulator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*emulator, "--api-key", key, "--price", "BTCUSDT=40000"],  # a synthetic book to trade against
            env={**prefect_env, "MELTICA_EMULATOR_API_SECRET": secret},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"emulator exited:\n{_tail(log)}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"emulator not listening after 30 s:\n{_tail(log)}"
                time.sleep(0.3)
        config = tmp_path / "paper.yaml"
        config.write_text(
            "environment: paper\n"
            "trading_mode: paper\n"
            "accounts:\n"
            "  - name: emu\n"
            "    exchange: binance\n"
            f"    emulator_url: http://127.0.0.1:{port}\n"
            "    api_key: env:FLOWS_EMU_KEY\n"
            "    api_secret: env:FLOWS_EMU_SECRET\n"
        )
        # The worker hands its environment to every flow run: that is how the credentials reach it.
        prefect_env.update(FLOWS_EMU_KEY=key, FLOWS_EMU_SECRET=secret)
        yield config
    finally:
        _stop(proc)


def _trade_by_hand(config: Path, env: dict[str, str]) -> None:
    """A market sell on the emulator account through ccxt's own binance class, as a person trading by hand would."""
    import ccxt

    from meltica.emulator import CCXT_OPTIONS, ccxt_urls_for

    [url] = re.findall(r"emulator_url: (\S+)", config.read_text())
    venue = ccxt.binance(
        {
            "apiKey": env["FLOWS_EMU_KEY"],
            "secret": env["FLOWS_EMU_SECRET"],
            "urls": {"api": ccxt_urls_for(url)},
            "options": dict(CCXT_OPTIONS),
        }
    )
    order = venue.create_order("BTC/USDT", "market", "sell", 0.001)
    assert order["filled"] == 0.001, order


def test_reconcile_now_runs_on_a_process_worker(
    prefect_server: str, prefect_env: dict[str, str], emulator_config: Path, fresh_database: Engine, tmp_path: Path
) -> None:
    env = prefect_env

    # Deploy: the work pool is created and every deployment of prefect.yaml exists on the server.
    deployed = _meltica(["flows", "deploy", "--config", str(emulator_config)], env, timeout=240)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    pool = _get(prefect_server + "/work_pools/meltica")
    assert pool["type"] == "process"
    flows = {f["id"]: f["name"] for f in _post(prefect_server + "/flows/filter", {})}
    deployments = {f"{flows[d['flow_id']]}/{d['name']}": d for d in _post(prefect_server + "/deployments/filter", {})}
    assert set(deployments) == EXPECTED_DEPLOYMENTS, deployed.stdout
    assert "skipped" not in deployed.stdout
    schedules = {name: [s["schedule"] for s in d["schedules"]] for name, d in deployments.items()}
    assert schedules["daily-risk-report/daily"] == [{"cron": "5 0 * * *", "timezone": "UTC", "day_or": True}]
    assert schedules["reconcile/every-15-minutes"][0]["interval"] == 900
    assert schedules["ingest/hourly"][0]["interval"] == 3600
    assert all(d["work_pool_name"] == "meltica" for d in deployments.values())
    for on_demand in ("reconcile/now", "backtest/run-backtest", "backtest-sweep/run-sweep"):
        assert not schedules[on_demand], on_demand
    # The configuration given at deploy time is every run's; with an account to reconcile, the schedule is on.
    assert deployments["reconcile/every-15-minutes"]["job_variables"]["env"]["MELTICA_CONFIG"] == str(emulator_config)
    assert not deployments["reconcile/every-15-minutes"]["paused"], deployed.stdout
    # Workers run the flows from this checkout (the pull step), wherever the worker was started.
    assert deployments["reconcile/now"]["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
    ]

    # A worker on the process pool, started elsewhere than the repository.
    worker_log = tmp_path / "worker.log"
    workdir = tmp_path / "worker"
    workdir.mkdir()
    with worker_log.open("wb") as out:
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "meltica", "--type", "process"],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        run = _meltica(
            ["reconcile", "--now", "--watch", "--timeout", "90", "--account", "emu", "--config", str(emulator_config)],
            env,
            timeout=150,
        )
        assert run.returncode == 0, f"{run.stdout}{run.stderr}\nworker:\n{_tail(worker_log)}"
        match = re.search(r"flow run \S+ \(([0-9a-f-]{36})\)", run.stdout)
        assert match, run.stdout
        flow_run = _get(f"{prefect_server}/flow_runs/{match.group(1)}")
        assert flow_run["state"]["type"] == "COMPLETED", _tail(worker_log)
        assert flow_run["deployment_id"] == deployments["reconcile/now"]["id"]
        assert flow_run["parameters"]["trigger"] == "cli"
        assert flow_run["parameters"]["accounts"] == ["emu"]
        # The flow reconciled the account against the emulator and stored the run; the CLI says what it found.
        with fresh_database.connect() as conn:
            stored = conn.execute(text("SELECT count(*) FROM reconciliation_runs WHERE account = 'emu'")).scalar_one()
        assert stored == 1
        assert "emu: completed, 0 discrepancies" in run.stdout, run.stdout

        # A failed run: the CLI prints why (the reason was only in the UI), and exits 1.
        unknown = _meltica(
            ["reconcile", "--now", "--watch", "--timeout", "90", "--account", "nope", "--config", str(emulator_config)],
            env,
            timeout=150,
        )
        assert unknown.returncode == 1, unknown.stdout + unknown.stderr
        assert "Failed" in unknown.stderr and "no account named 'nope'" in unknown.stderr, unknown.stderr

        # A trade Meltica never sent (someone traded by hand): the run halts the account, the CLI exits 1.
        _trade_by_hand(emulator_config, env)
        halted = _meltica(
            ["reconcile", "--now", "--watch", "--timeout", "90", "--account", "emu", "--config", str(emulator_config)],
            env,
            timeout=150,
        )
        assert halted.returncode == 1, f"{halted.stdout}{halted.stderr}\nworker:\n{_tail(worker_log)}"
        assert "halt needed: emu: kill switch engaged on account:emu" in halted.stderr, halted.stdout + halted.stderr
    finally:
        _stop(worker)


def test_a_deployment_from_a_second_checkout_runs_that_checkout(
    prefect_server: str, prefect_env: dict[str, str], tmp_path: Path
) -> None:
    """`meltica flows deploy` run in another checkout (same virtualenv) binds the deployments to that checkout;
    every name it prints is one `prefect deployment run` accepts."""
    import shutil

    checkout = tmp_path / "second-checkout"
    checkout.mkdir()
    shutil.copy(ROOT / "prefect.yaml", checkout / "prefect.yaml")
    shutil.copytree(ROOT / "flows", checkout / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    env = prefect_env
    deployed = subprocess.run(
        [sys.executable, "-m", "meltica", "flows", "deploy"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    printed = re.findall(r"deployed (\S+)", deployed.stdout)
    assert set(printed) == EXPECTED_DEPLOYMENTS, deployed.stdout
    # No configuration with an account to reconcile: that schedule is created paused, saying why.
    flows = {f["id"]: f["name"] for f in _post(prefect_server + "/flows/filter", {})}
    made = {f"{flows[d['flow_id']]}/{d['name']}": d for d in _post(prefect_server + "/deployments/filter", {})}
    reconcile = made["reconcile/every-15-minutes"]
    assert reconcile["paused"] and reconcile["description"].startswith("PAUSED: "), reconcile["description"]
    assert "reconcile/every-15-minutes: schedule paused" in deployed.stdout
    assert not made["daily-risk-report/daily"]["paused"]
    for name in printed:  # scheduled a day ahead: the worker below does not pick them up
        accepted = subprocess.run(
            [PREFECT, "deployment", "run", name, "--start-in", "1 day", "--params", json.dumps(REQUIRED.get(name, {}))],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert accepted.returncode == 0, f"{name}: {accepted.stdout}{accepted.stderr}"

    worker_log = tmp_path / "worker.log"
    with worker_log.open("wb") as out:
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "meltica", "--type", "process"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        run = subprocess.run(
            [PREFECT, "deployment", "run", "daily-risk-report/daily", "-p", "day=2026-01-05", "--watch"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert run.returncode == 0, f"{run.stdout}{run.stderr}\nworker:\n{_tail(worker_log)}"
    finally:
        _stop(worker)
    # The run wrote its files (relative output_dir) in the checkout it was deployed from.
    assert (checkout / "out" / "risk-reports" / "risk-report-2026-01-05.md").is_file(), _tail(worker_log)
    assert not (ROOT / "out" / "risk-reports" / "risk-report-2026-01-05.md").exists()


def test_reconcile_now_without_a_server_is_one_clear_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    unset = _meltica(["reconcile", "--now"], env, timeout=60)
    assert unset.returncode == 1
    assert "PREFECT_API_URL is not set" in unset.stderr and "prefect server start" in unset.stderr
    assert len(unset.stderr.strip().splitlines()) == 1, unset.stderr

    env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"  # discard port: nothing listens
    down = _meltica(["flows", "deploy"], env, timeout=60)
    assert down.returncode == 1
    assert "unreachable" in down.stderr and "prefect server start" in down.stderr


def test_a_run_whose_worker_and_process_are_killed_ends_crashed(
    prefect_server: str, prefect_env: dict[str, str], tmp_path: Path
) -> None:
    """A host crash (worker and flow process killed): the heartbeat automation `flows deploy` creates marks the
    run Crashed instead of leaving it Running forever."""
    import signal

    env = prefect_env
    deployed = _meltica(["flows", "deploy"], env, timeout=240)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    automations = [a["name"] for a in _post(prefect_server + "/automations/filter", {})]
    assert "meltica: crash flow runs whose heartbeats stopped" in automations

    worker_log = tmp_path / "worker.log"
    with worker_log.open("wb") as out:
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "meltica", "--type", "process"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    flow_pid: int | None = None
    try:
        sweep = _get(prefect_server + "/deployments/name/backtest-sweep/run-sweep")
        data = ROOT / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
        run = _post(
            f"{prefect_server}/deployments/{sweep['id']}/create_flow_run",
            {
                "parameters": {
                    "strategy": "momentum",
                    "grid_space": {"fast": list(range(2, 120)), "slow": [150]},
                    "base_params": {"quantity": "0.01"},
                    "data_file": str(data),
                    "workers": 1,
                    "output_dir": str(tmp_path / "sweep"),
                }
            },
        )
        # Running, with its process known and a first heartbeat sent.
        deadline = time.monotonic() + 120
        while True:
            state = _get(f"{prefect_server}/flow_runs/{run['id']}")
            beats = _post(
                prefect_server + "/events/filter",
                {
                    "filter": {
                        "event": {"name": ["prefect.flow-run.heartbeat"]},
                        "resource": {"id": [f"prefect.flow-run.{run['id']}"]},
                    }
                },
            )
            if state["state"]["type"] == "RUNNING" and state.get("infrastructure_pid") and beats["events"]:
                flow_pid = int(str(state["infrastructure_pid"]).rsplit(":", 1)[-1])
                break
            assert state["state"]["type"] in ("SCHEDULED", "PENDING", "RUNNING"), state["state"]
            assert time.monotonic() < deadline, f"no running, beating run after 120 s:\n{_tail(worker_log)}"
            time.sleep(1)
        # The host dies: the worker and the flow run's process are killed without a chance to report.
        worker.kill()
        worker.wait(timeout=10)
        os.kill(flow_pid, signal.SIGKILL)
        flow_pid = None

        deadline = time.monotonic() + 240
        while True:
            state = _get(f"{prefect_server}/flow_runs/{run['id']}")["state"]
            if state["type"] != "RUNNING":
                break
            assert time.monotonic() < deadline, "the run is still Running 240 s after its process was killed"
            time.sleep(2)
        assert state["type"] == "CRASHED", state
        assert "heartbeat" in (state.get("message") or ""), state
    finally:
        if flow_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(flow_pid, signal.SIGKILL)
        _stop(worker)
