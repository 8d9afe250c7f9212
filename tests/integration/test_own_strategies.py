"""A strategy of one's own, outside the package, in ``backtest``, ``optimize``, ``paper`` (the live pipeline's
worker processes) and ``meltica strategies list``: by file, module, strategies directory and entry point."""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from meltica.cli import app
from meltica.infra.kafka import KafkaEndpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "strategies" / "writing-a-strategy.md"
DEMO = REPO / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
BIN = Path(sys.executable).parent

# Trades on a schedule, so a run that loaded it has orders and fills whatever the prices do.
FLIP_FLOP = '''
from decimal import Decimal
from typing import ClassVar

from meltica.domain import Bar
from meltica.strategies import Strategy, StrategyParams, register_strategy


class FlipFlopParams(StrategyParams):
    symbol: str = "BTC/USDT:USDT"
    quantity: Decimal = Decimal("0.01")
    every: int = 5


@register_strategy
class FlipFlop(Strategy[FlipFlopParams]):
    """Buys on every ``every``-th bar when flat, sells it back on the next one."""

    name: ClassVar[str] = "flip_flop"
    Params: ClassVar[type[FlipFlopParams]] = FlipFlopParams

    def on_bar(self, bar: Bar) -> None:
        seen = int(self.ctx.state.get("seen", 0)) + 1
        self.ctx.state["seen"] = seen
        if seen % self.params.every == 0:
            if self.ctx.position(bar.symbol).is_flat:
                self.ctx.buy(bar.symbol, self.params.quantity)
            else:
                self.ctx.sell(bar.symbol, self.params.quantity)
'''


def meltica(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "meltica"), *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def fills_of(output: Path) -> list[dict[str, Any]]:
    with (output / "fills.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def own(tmp_path: Path) -> Path:
    """A user's project folder: ``flip_flop.py`` and ``bars.csv`` (the demo dataset's first 2,000 bars)."""
    (tmp_path / "flip_flop.py").write_text(FLIP_FLOP)
    with gzip.open(DEMO, "rt") as demo:
        (tmp_path / "bars.csv").write_text("".join(line for _, line in zip(range(2001), demo, strict=False)))
    return tmp_path


def test_file_reference_backtests(own: Path) -> None:
    proc = meltica(
        "backtest", "--strategy", "./flip_flop.py:FlipFlop", "--data", "bars.csv", "--symbol", "BTC/USDT:USDT",
        "--output", "out", "--no-store", "--no-progress", cwd=own,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(fills_of(own / "out")) >= 10
    assert json.loads((own / "out" / "metrics.json").read_text())["run"]["strategy"] == "./flip_flop.py:FlipFlop"


def test_strategies_directory_by_name_in_optimize_workers(own: Path) -> None:
    """The pool's worker processes (forkserver) find a name registered from a strategies directory."""
    proc = meltica(
        "optimize", "--strategy", "flip_flop", "--grid", "every=3,7", "--data", str(own / "bars.csv"), "--symbol",
        "BTC/USDT:USDT", "--param", "symbol=BTC/USDT:USDT", "--path", "engine", "--workers", "2", "--no-store",
        cwd=own / "..", env={"MELTICA_STRATEGY_PATHS": json.dumps([str(own)])},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "2 runs, 0 failed" in proc.stdout, proc.stdout


def test_module_reference_paper_trades_through_the_pipeline_workers(own: Path, kafka_endpoint: KafkaEndpoint) -> None:
    """``paper`` runs the strategy in a separate worker process (the live pipeline's): it must load it too."""
    proc = meltica(
        "paper", "--strategy", "flip_flop:FlipFlop", "--data", "bars.csv", "--symbol", "BTC/USDT:USDT",
        "--max-bars", "100", "--output", "out", cwd=own, env={"PYTHONPATH": str(own)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(fills_of(own / "out")) >= 10
    # normal output without noise: the progress line at bar 100 is also the last one, said once; no broker
    # leader-election errors of the run's new topics
    progress = [line for line in proc.stdout.splitlines() if line.startswith("bar ")]
    assert len(progress) == len(set(progress)) == 1, proc.stdout
    assert "NotLeaderForPartitionError" not in proc.stdout + proc.stderr


def test_strategies_list_shows_every_source(own: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    site = tmp_path_factory.mktemp("site")  # an installed distribution declaring an entry point
    (site / "packaged_strats.py").write_text(FLIP_FLOP.replace('"flip_flop"', '"packaged_flip_flop"'))
    info = site / "packaged_strats-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: packaged-strats\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[meltica.strategies]\npackaged = packaged_strats:FlipFlop\n")
    directory = own / "strategies"
    directory.mkdir()
    (directory / "in_directory.py").write_text(FLIP_FLOP.replace('"flip_flop"', '"directory_flip_flop"'))
    (directory / "_helper.py").write_text("raise RuntimeError('files starting with _ are not strategies')\n")
    (own / "settings.yaml").write_text("strategy_paths: [strategies]\n")

    proc = meltica(
        "strategies", "list", "--json", "--config", "settings.yaml", "./flip_flop.py:FlipFlop", cwd=own,
        env={"PYTHONPATH": str(site)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert listed["momentum"]["source"] == "built-in"
    assert listed["flip_flop"]["source"] == str(own / "flip_flop.py")
    assert listed["directory_flip_flop"]["source"] == str(directory / "in_directory.py")
    assert listed["packaged_flip_flop"]["source"] == "entry point packaged = packaged_strats:FlipFlop (packaged-strats)"
    assert listed["flip_flop"]["params"] == {"symbol": "BTC/USDT:USDT", "quantity": "0.01", "every": 5}


@pytest.mark.parametrize(
    ("reference", "says"),
    [
        ("./missing.py:FlipFlop", "does not exist"),
        ("./flip_flop.py:Nothing", "has no 'Nothing'"),
        ("no_such_module_here:FlipFlop", "cannot import module"),
        ("rsi", "unknown strategy 'rsi'"),
    ],
)
def test_a_reference_that_cannot_load_is_one_line(
    own: Path, reference: str, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(own)
    result = CliRunner().invoke(app, ["backtest", "--strategy", reference, "--data", "bars.csv", "--output", "out"])
    assert result.exit_code == 2
    assert says in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_guides_commands_run_as_written(tmp_path: Path, fresh_database: Engine) -> None:
    """The guide's shell commands, from a folder holding the guide's ``breakout.py`` (its first snippet). The
    backtest stores its run in a database of its own, not the shared dev database (which parallel workers,
    other sessions and other checkouts' migrations also use)."""
    text = GUIDE.read_text()
    python = re.findall(r"```python\n(.*?)```", text, re.S)
    (tmp_path / "breakout.py").write_text(python[0])
    (tmp_path / "meltica").mkdir()
    (tmp_path / "meltica" / "data").symlink_to(REPO / "meltica" / "data")  # the guide runs from a clone
    section = text[text.index("## Use it from the command line") :]
    commands = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert commands
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["MELTICA_DATABASE_URL"] = fresh_database.url.render_as_string(hide_password=False)
    for command in commands:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command],
            capture_output=True, text=True, timeout=240, check=False, cwd=tmp_path, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "out" / "breakout" / "metrics.json").is_file()
    assert "breakout" in proc.stdout  # `meltica strategies list` shows it (the table folds its source path)
