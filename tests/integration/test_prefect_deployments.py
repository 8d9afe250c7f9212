"""End to end on a real `prefect server` on loopback: `meltica flows deploy` creates the deployments of
prefect.yaml, a worker on the `meltica` process pool picks up an on-demand reconciliation triggered by
`meltica reconcile --now --watch`, and the flow run completes; a backtest's artifact links its report, served
by `meltica reports serve`; a host crash ends its runs (Crashed, or Cancelled when a cancel was asked).

Everything runs as separate processes, as an operator would run them; the server's database and the
client profile live in a temporary PREFECT_HOME. The server (started by `meltica flows server`), the
deployments, the emulator and the report server are shared by this module's tests (they are expensive to
start); each test starts its own worker, so one killing its worker leaves the others theirs.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _base_env(home: Path, database: Engine) -> dict[str, str]:
    """Environment for every process of a test: an isolated PREFECT_HOME and the test database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_LOGGING_LEVEL="INFO",
        MELTICA_DATABASE_URL=database.url.render_as_string(hide_password=False),
    )
    return env


@contextlib.contextmanager
def _running_server(env: dict[str, str], log: Path) -> Iterator[str]:
    """`meltica flows server` on a free loopback port, as an operator starts it; yields its API URL once
    /api/health answers, with PREFECT_API_URL set in ``env``."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meltica", "flows", "server", "--port", str(port)],
            env=env,
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
        env["PREFECT_API_URL"] = api
        yield api
    finally:
        _stop(proc)


@contextlib.contextmanager
def _running_worker(env: dict[str, str], cwd: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`prefect worker start --pool meltica` from ``cwd`` (elsewhere than the repository)."""
    cwd.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "meltica", "--type", "process"],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield worker
    finally:
        _stop(worker)


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prefect-deployments")


@pytest.fixture(scope="module")
def prefect_env(module_dir: Path, module_database: Engine) -> dict[str, str]:
    """The module's environment; flow runs link reports under MELTICA_REPORTS_URL (the report server's port)."""
    env = _base_env(module_dir / "prefect-home", module_database)
    env["MELTICA_REPORTS_URL"] = f"http://127.0.0.1:{_free_port()}"
    return env


@pytest.fixture(scope="module")
def prefect_server(prefect_env: dict[str, str], module_dir: Path) -> Iterator[str]:
    with _running_server(prefect_env, module_dir / "server.log") as api:
        yield api


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


@pytest.fixture(scope="module")
def emulator_config(prefect_env: dict[str, str], module_dir: Path) -> Iterator[Path]:
    """A Binance emulator process and a configuration file whose one account, `emu`, trades on it."""
    port = _free_port()
    tmp_path = module_dir
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


@pytest.fixture(scope="module")
def deployed(prefect_server: str, prefect_env: dict[str, str], emulator_config: Path) -> Deployed:
    """`meltica flows deploy --config` once for the module: its output and the deployments by `flow/name`."""
    done = _meltica(["flows", "deploy", "--config", str(emulator_config)], prefect_env, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    flows = {f["id"]: f["name"] for f in _post(prefect_server + "/flows/filter", {})}
    made = {f"{flows[d['flow_id']]}/{d['name']}": d for d in _post(prefect_server + "/deployments/filter", {})}
    return Deployed(done.stdout, made)


@dataclass(frozen=True)
class Deployed:
    stdout: str
    deployments: dict[str, dict[str, Any]]


@pytest.fixture
def worker(deployed: Deployed, prefect_env: dict[str, str], tmp_path: Path) -> Iterator[Path]:
    """A worker of this test on the process pool, started elsewhere than the repository; yields its log."""
    log = tmp_path / "worker.log"
    with _running_worker(prefect_env, tmp_path / "worker", log):
        yield log


@pytest.fixture(scope="module")
def reports_url(prefect_env: dict[str, str], module_database: Engine, module_dir: Path) -> Iterator[str]:
    """`meltica reports serve` on the port MELTICA_REPORTS_URL names, as the runtime role."""
    from tests.integration.conftest import runtime_url_of

    url = prefect_env["MELTICA_REPORTS_URL"]
    log = module_dir / "reports.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meltica", "reports", "serve", "--port", url.rsplit(":", 1)[1]],
            env={**prefect_env, "MELTICA_DATABASE_URL": runtime_url_of(module_database)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"reports serve exited:\n{_tail(log)}"
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as resp:  # noqa: S310 - loopback
                    if resp.read() == b"ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"reports serve not answering after 60 s:\n{_tail(log)}"
            time.sleep(0.3)
        yield url
    finally:
        _stop(proc)


def _wait_final(api: str, flow_run_id: str, timeout: float, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state: dict[str, Any] = _get(f"{api}/flow_runs/{flow_run_id}")["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        assert time.monotonic() < deadline, f"flow run still {state['type']} after {timeout} s:\n{_tail(log)}"
        time.sleep(1)


def test_deploy_creates_every_deployment_with_its_schedule(deployed: Deployed, emulator_config: Path) -> None:
    deployments, stdout = deployed.deployments, deployed.stdout
    assert set(deployments) == EXPECTED_DEPLOYMENTS, stdout
    assert "skipped" not in stdout
    schedules = {name: [s["schedule"] for s in d["schedules"]] for name, d in deployments.items()}
    assert schedules["daily-risk-report/daily"] == [{"cron": "5 0 * * *", "timezone": "UTC", "day_or": True}]
    assert schedules["reconcile/every-15-minutes"][0]["interval"] == 900
    assert schedules["ingest/hourly"][0]["interval"] == 3600
    assert all(d["work_pool_name"] == "meltica" for d in deployments.values())
    for on_demand in ("reconcile/now", "backtest/run-backtest", "backtest-sweep/run-sweep"):
        assert not schedules[on_demand], on_demand
    # The configuration given at deploy time is every run's; with an account to reconcile, the schedule is on.
    assert deployments["reconcile/every-15-minutes"]["job_variables"]["env"]["MELTICA_CONFIG"] == str(emulator_config)
    assert not deployments["reconcile/every-15-minutes"]["paused"], stdout
    # Workers run the flows from this checkout (the pull step), wherever the worker was started.
    assert deployments["reconcile/now"]["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
    ]
    # The server `meltica flows server` started bounds a cancel nobody confirms: deploy has nothing to warn of.
    assert "cancel nobody confirms" not in stdout, stdout


def test_reconcile_now_runs_on_a_process_worker(
    prefect_server: str,
    prefect_env: dict[str, str],
    emulator_config: Path,
    deployed: Deployed,
    worker: Path,
    module_database: Engine,
) -> None:
    env, worker_log = prefect_env, worker
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
    assert flow_run["deployment_id"] == deployed.deployments["reconcile/now"]["id"]
    assert flow_run["parameters"]["trigger"] == "cli"
    assert flow_run["parameters"]["accounts"] == ["emu"]
    # The flow reconciled the account against the emulator and stored the run; the CLI says what it found.
    with module_database.connect() as conn:
        stored = conn.execute(
            text("SELECT count(*) FROM reconciliation_runs WHERE account = 'emu' AND trigger = 'cli'")
        ).scalar_one()
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


def test_a_backtest_artifact_links_its_report_served_over_http(
    prefect_server: str, deployed: Deployed, worker: Path, reports_url: str, tmp_path: Path
) -> None:
    """The artifact's link works from a browser: the stored report.html and its charts, from `reports serve`."""
    backtest = deployed.deployments["backtest/run-backtest"]
    data = ROOT / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
    run = _post(
        f"{prefect_server}/deployments/{backtest['id']}/create_flow_run",
        {
            "parameters": {
                "strategy": "momentum",
                "params": {"fast": 10, "slow": 40, "quantity": "0.01"},
                "start": "2022-01-01T00:00:00Z",
                "end": "2022-01-02T00:00:00Z",
                "data_file": str(data),
                "output_dir": str(tmp_path / "out"),
            }
        },
    )
    state = _wait_final(prefect_server, run["id"], 240, worker)
    assert state["type"] == "COMPLETED", f"{state}\n{_tail(worker)}"
    artifacts = {
        a["key"]: a
        for a in _post(prefect_server + "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    }
    charts = artifacts["backtest-charts"]["data"]
    assert "file://" not in charts
    match = re.search(r"\[Full report\]\((http://[^)\s]+/report\.html)\)", charts)
    assert match, charts[-600:]
    url = match.group(1)
    assert url.startswith(reports_url + "/reports/"), url
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - the loopback report server
        assert resp.headers["Content-Type"].startswith("text/html")
        page = resp.read().decode()
    assert "<title>Backtest momentum" in page and '="equity.png"' in page  # the page shows or links it
    # The chart the page shows, relative to it, is the one the artifact embeds.
    with urllib.request.urlopen(urllib.parse.urljoin(url, "equity.png"), timeout=10) as resp:  # noqa: S310
        assert resp.headers["Content-Type"] == "image/png"
        png = resp.read()
    embedded = re.search(r"!\[equity\.png\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", charts)
    assert embedded and base64.b64decode(embedded.group(1)) == png and png.startswith(b"\x89PNG")
    # Nothing else is reachable: an unknown report is 404.
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url.replace(url.split("/")[-2], str(uuid.uuid4())), timeout=10)  # noqa: S310
    assert missing.value.code == 404


def test_a_deployment_from_a_second_checkout_runs_that_checkout(fresh_database: Engine, tmp_path: Path) -> None:
    """`meltica flows deploy` run in another checkout (same virtualenv) binds the deployments to that checkout;
    every name it prints is one `prefect deployment run` accepts. A server of its own: it replaces the
    deployments."""

    env = _base_env(tmp_path / "prefect-home", fresh_database)
    with _running_server(env, tmp_path / "server.log") as prefect_server:
        _deploy_from_a_second_checkout(prefect_server, env, tmp_path)


def _deploy_from_a_second_checkout(prefect_server: str, env: dict[str, str], tmp_path: Path) -> None:
    import shutil

    checkout = tmp_path / "second-checkout"
    checkout.mkdir()
    shutil.copy(ROOT / "prefect.yaml", checkout / "prefect.yaml")
    shutil.copytree(ROOT / "flows", checkout / "flows", ignore=shutil.ignore_patterns("__pycache__"))
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
    with _running_worker(env, tmp_path / "worker", worker_log):
        run = subprocess.run(
            [PREFECT, "deployment", "run", "daily-risk-report/daily", "-p", "day=2026-01-05", "--watch"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert run.returncode == 0, f"{run.stdout}{run.stderr}\nworker:\n{_tail(worker_log)}"
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


def _running_and_beating(api: str, flow_run_id: str) -> int | None:
    """The flow run's process id once it is Running and has sent a heartbeat, else None."""
    state = _get(f"{api}/flow_runs/{flow_run_id}")
    beats = _post(
        api + "/events/filter",
        {
            "filter": {
                "event": {"name": ["prefect.flow-run.heartbeat"]},
                "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]},
            }
        },
    )
    assert state["state"]["type"] in ("SCHEDULED", "PENDING", "RUNNING"), state["state"]
    if state["state"]["type"] == "RUNNING" and state.get("infrastructure_pid") and beats["events"]:
        return int(str(state["infrastructure_pid"]).rsplit(":", 1)[-1])
    return None


def test_runs_whose_worker_and_process_are_killed_end_crashed_or_cancelled(
    prefect_server: str, prefect_env: dict[str, str], deployed: Deployed, tmp_path: Path
) -> None:
    """A host crash (worker and flow processes killed): the heartbeat automation `flows deploy` creates marks a
    run Crashed instead of leaving it Running forever; a run the operator cancels after the crash (nobody is left
    to confirm the cancel) ends Cancelled instead of staying Cancelling, with a new worker up."""
    import signal

    env = prefect_env
    automations = [a["name"] for a in _post(prefect_server + "/automations/filter", {})]
    assert "meltica: crash flow runs whose heartbeats stopped" in automations

    sweep = deployed.deployments["backtest-sweep/run-sweep"]
    data = ROOT / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
    runs = [
        _post(
            f"{prefect_server}/deployments/{sweep['id']}/create_flow_run",
            {
                "parameters": {
                    "strategy": "momentum",
                    "grid_space": {"fast": list(range(2, 120)), "slow": [slow]},
                    "base_params": {"quantity": "0.01"},
                    "data_file": str(data),
                    "workers": 1,
                    "output_dir": str(tmp_path / "sweep"),
                }
            },
        )["id"]
        for slow in (150, 160)
    ]
    crashed, cancelled = runs
    worker_log = tmp_path / "worker.log"
    pids: dict[str, int] = {}
    try:
        with _running_worker(env, tmp_path / "worker", worker_log) as worker:
            # Both Running, with their processes known and a first heartbeat sent.
            deadline = time.monotonic() + 180
            while len(pids) < len(runs):
                for run in runs:
                    if run not in pids and (pid := _running_and_beating(prefect_server, run)) is not None:
                        pids[run] = pid
                assert time.monotonic() < deadline, f"no running, beating runs after 180 s:\n{_tail(worker_log)}"
                time.sleep(1)
            # The host dies: the worker and the flow runs' processes are killed without a chance to report.
            worker.kill()
            worker.wait(timeout=10)
            for pid in pids.values():
                os.kill(pid, signal.SIGKILL)
            pids.clear()
        # The operator cancels one of them (the UI's Cancel), and a new worker comes up.
        cancel = _post(
            f"{prefect_server}/flow_runs/{cancelled}/set_state",
            {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": False},
        )
        assert cancel["status"] == "ACCEPT", cancel
        # Both end within one bound from the cancel: the automation's 90 s without a heartbeat, the server's 90 s
        # in Cancelling (`meltica flows server`; Prefect's own default, 300 s, would miss it), plus slack.
        cancelled_at = time.monotonic()
        with _running_worker(env, tmp_path / "new-worker", tmp_path / "new-worker.log"):
            final = {run: _wait_final(prefect_server, run, 200, tmp_path / "new-worker.log") for run in runs}
        assert time.monotonic() - cancelled_at < 200, final
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert final[crashed]["type"] == "CRASHED", final[crashed]
    assert "heartbeat" in (final[crashed].get("message") or ""), final[crashed]
    assert final[cancelled]["type"] == "CANCELLED", final[cancelled]
