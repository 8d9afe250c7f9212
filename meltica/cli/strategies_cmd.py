"""`meltica strategies list`: what strategies are registered, and where each came from.

A strategy of your own is used without editing Meltica, in every command that takes ``--strategy`` and in a
live deployment's ``live.instances[].strategy``:

* ``--strategy path/to/file.py:Class`` — a file anywhere (relative paths from the current directory);
* ``--strategy package.module:Class`` — a module on ``sys.path`` (``PYTHONPATH``);
* ``--strategy name`` — the built-ins, the ``meltica.strategies`` entry points of installed packages, and
  every ``.py`` file of the strategies directories (``strategy_paths`` in the configuration file, or
  ``MELTICA_STRATEGY_PATHS='["./strategies"]'``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic_core import PydanticUndefined
from rich.table import Table

from meltica.cli._common import console, reports_errors
from meltica.config import load_settings
from meltica.strategies.registry import get_strategy, resolve_strategy, strategy_sources

app = typer.Typer(no_args_is_help=True)


@app.command("list")
@reports_errors
def list_command(
    references: Annotated[
        list[str] | None,
        typer.Argument(help="Also load these: path/to/file.py:Class or module:Class.", show_default=False),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="A configuration file whose strategy_paths to load."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object: name -> source and parameters.")] = False,
) -> None:
    """List the registered strategies: name, where it was registered from, and its parameters with defaults."""
    if config is not None:
        load_settings(config_file=config)  # registers its strategy_paths
    for reference in references or []:
        resolve_strategy(reference)
    sources = strategy_sources()
    rows: dict[str, dict[str, Any]] = {}
    for name, source in sources.items():
        fields = get_strategy(name).Params.model_fields
        rows[name] = {
            "source": source,
            "params": {field: _default(info.default) for field, info in fields.items()},
        }
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Registered strategies")
    table.add_column("name", no_wrap=True)
    table.add_column("source", overflow="fold")
    table.add_column("parameters (defaults)", overflow="fold")
    for name, row in rows.items():
        params = ", ".join(f"{field}={value}" for field, value in row["params"].items())
        table.add_row(name, str(row["source"]), params)
    console.print(table)


def _default(value: object) -> object:
    if value is PydanticUndefined:
        return "(required)"
    return value if isinstance(value, int | float | bool | str) or value is None else str(value)
