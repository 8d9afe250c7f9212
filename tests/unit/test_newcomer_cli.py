"""What a newcomer meets first: the top-level help, a missing worker file, the shipped example worker file,
and Prefect server hints that name the port actually configured."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meltica.cli import app
from meltica.errors import InfrastructureUnavailableError
from meltica.infra.prefect import require_server_url

REPO = Path(__file__).resolve().parents[2]


def test_top_level_help_describes_every_area() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    summary = " ".join(result.stdout.split())
    for area in ("infrastructure", "database", "market data", "strategies", "backtests", "sweeps", "paper",
                 "live pipeline", "kill switch", "Prefect", "reconciliation", "emulator", "API keys"):  # fmt: skip
        assert area in summary, area


def test_a_missing_worker_file_is_one_line_not_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["streams", "worker", "--config", "worker.yaml"])
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "'worker.yaml' not found" in lines[0]
    assert "infra/examples/worker.yaml" in lines[0]


def test_the_example_worker_file_builds_its_processors() -> None:
    from streams.pipeline import build_processors
    from streams.worker import load_config, resolve_config

    config = resolve_config(load_config(REPO / "infra" / "examples" / "worker.yaml"))
    names = [type(processor).__name__ for processor in build_processors(config)]
    assert names == ["CandleProcessor", "StrategyHost", "RiskGate", "ExecutionService"]


def test_an_unreachable_server_hint_names_the_configured_port(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    with pytest.raises(InfrastructureUnavailableError) as raised:
        require_server_url(timeout=2)
    message = str(raised.value)
    assert f"meltica flows server --port {port}" in message
    assert f"export PREFECT_API_URL=http://127.0.0.1:{port}/api" in message
    assert "4200" not in message


class _ZeroMetrics:
    def __getattr__(self, name: str) -> int:
        return 0


def test_a_result_tables_title_keeps_the_run_id_on_one_line() -> None:
    from types import SimpleNamespace

    from rich.console import Console

    from meltica.cli.backtest_cmd import summary_table

    run_id = "0f0e4a52-6c3b-4c50-9a5e-0123456789ab"
    result = SimpleNamespace(
        strategy="./breakout.py:Breakout", symbols=["BTC/USDT:USDT"], timeframe="1m", run_id=run_id,
        metrics=_ZeroMetrics(), fills=[], orders=[], rejections={},
    )  # fmt: skip
    console = Console(width=160, file=io.StringIO())
    console.print(summary_table(result))
    assert any(run_id in line for line in console.file.getvalue().splitlines())  # type: ignore[attr-defined]


def test_leader_election_noise_of_the_runs_new_topics_only_until_it_is_over() -> None:
    import logging

    from meltica.live.paper import _LeaderElectionNoise

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("aiokafka", logging.WARNING, __file__, 1, message, None, None)

    noise = _LeaderElectionNoise("paper.abc.")
    ours = "Failed fetch offsets: NotLeaderForPartitionError: TopicPartition(topic='paper.abc.orders', partition=3)"
    theirs = "Failed fetch offsets: NotLeaderForPartitionError: TopicPartition(topic='live.orders', partition=0)"
    producer = "Got error produce response: <class 'aiokafka.errors.NotLeaderForPartitionError'>"
    assert not noise.filter(record(ours))
    assert not noise.filter(record(producer))
    assert noise.filter(record(theirs))
    assert noise.filter(record("Unable to connect to node 1"))
    noise.over = True
    assert noise.filter(record(ours))
