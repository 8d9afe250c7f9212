"""`meltica config` commands: show and validate the effective configuration, manage encrypted secrets."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
import yaml

from meltica.config import load_settings, masked_settings
from meltica.config.settings import MelticaSettings
from meltica.errors import ConfigurationError, SecretError
from meltica.secrets import encrypt_secret, generate_master_key

app = typer.Typer(no_args_is_help=True)

EXIT_INVALID = 2

EnvOption = Annotated[
    str | None,
    typer.Option("--env", "-e", help="dev, paper, staging or prod (default: MELTICA_ENV, else dev)."),
]
ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Configuration file to use instead of the packaged one.")
]


class ConfigOutputFormat(StrEnum):
    yaml = "yaml"
    json = "json"


def _load(env: str | None, config: Path | None) -> MelticaSettings:
    try:
        return load_settings(env=env, config_file=config)
    except ConfigurationError as exc:
        for line in str(exc).splitlines():
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(EXIT_INVALID) from None


@app.command("show")
def show(
    env: EnvOption = None,
    config: ConfigOption = None,
    output: Annotated[
        ConfigOutputFormat, typer.Option("--format", "-f", help="Output format.")
    ] = ConfigOutputFormat.yaml,
) -> None:
    """Print the effective configuration (file + MELTICA_* overrides) with secrets masked."""
    data = masked_settings(_load(env, config))
    if output is ConfigOutputFormat.json:
        typer.echo(json.dumps(data, indent=2))
    else:
        typer.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip())


@app.command("validate")
def validate(env: EnvOption = None, config: ConfigOption = None) -> None:
    """Check the configuration; exit 2 with `error: <file>: <field>: <problem>` lines when invalid."""
    settings = _load(env, config)
    typer.echo(f"ok: {settings.environment} configuration is valid (trading_mode {settings.trading_mode})")


@app.command("encrypt")
def encrypt() -> None:
    """Encrypt a secret read from stdin (or a hidden prompt) with MELTICA_MASTER_KEY; print `encrypted:…`."""
    plain = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else typer.prompt("secret", hide_input=True)
    try:
        typer.echo(encrypt_secret(plain))
    except SecretError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_INVALID) from None


@app.command("generate-key")
def generate_key() -> None:
    """Print a new master key for MELTICA_MASTER_KEY (store it in a secret manager, not in git)."""
    typer.echo(generate_master_key())
