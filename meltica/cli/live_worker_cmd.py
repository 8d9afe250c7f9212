"""``meltica live worker`` and ``meltica live sinks``: one process of a live deployment, in the foreground.

Each runs the same command the supervisor (``meltica live start``) spawns — ``python -m streams.worker
--settings FILE --worker NAME`` and ``python -m streams.sinks --settings FILE`` — so a deployment can be
spread over several machines, one process each. SIGTERM / SIGINT are passed on (graceful stop); the exit
code is the process's (2: refused to start, e.g. a risk limit is missing outside dev).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

ConfigOption = Annotated[
    Path,
    typer.Option("--config", "-c", help="The deployment's settings file (accounts, risk, live).", exists=True),
]


def _run_child(argv: list[str]) -> int:
    child = subprocess.Popen(argv)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def worker(
    config: ConfigOption,
    name: Annotated[str, typer.Option("--worker", "-w", help="A worker name from live.workers.")] = "pipeline",
    log_level: Annotated[str, typer.Option("--log-level", help="Log level of the worker.")] = "INFO",
) -> None:
    """Run one stream worker of a live deployment (its stages from live.workers)."""
    argv = [sys.executable, "-m", "streams.worker", "--settings", str(config), "--worker", name]
    raise typer.Exit(_run_child([*argv, "--log-level", log_level]))


def sinks(config: ConfigOption) -> None:
    """Run the sink worker of a live deployment (market data, orders, fills, positions into the database)."""
    raise typer.Exit(_run_child([sys.executable, "-m", "streams.sinks", "--settings", str(config)]))
