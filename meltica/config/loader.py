"""Find, read and validate the configuration; turn every failure into one clear ``ConfigurationError``.

Selection: ``config_file`` if given, else ``meltica/config/environments/<env>.yaml`` where ``env`` is
the argument, else ``MELTICA_ENV``, else ``dev``. ``MELTICA_*`` variables override file values.
Each problem is reported as ``<source>: <field>: <problem>``, where source is the file or the
environment variable the bad value came from and field is the dotted path (``risk.max_order_notional``,
``accounts[0].api_key``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import SecretStr, ValidationError

from meltica.config.settings import ENVIRONMENTS, MelticaSettings
from meltica.errors import ConfigurationError
from meltica.secrets import MASK, describe_secret, is_secret_reference
from meltica.strategies.registry import list_strategies, use_strategy_directories, validate_params

ENV_SELECTOR = "MELTICA_ENV"
ENVIRONMENTS_DIR = Path(__file__).resolve().parent / "environments"
_PROD_RISK_FIELDS = ("daily_loss_limit", "max_order_notional", "max_gross_exposure")
_SECRET_FIELDS = ("api_key", "api_secret", "password")


def environment_file(env: str) -> Path:
    """The packaged configuration file of ``env``."""
    return ENVIRONMENTS_DIR / f"{env}.yaml"


def load_settings(env: str | None = None, config_file: Path | str | None = None) -> MelticaSettings:
    """Validated settings, or ``ConfigurationError`` naming the file, the field and the problem."""
    selected = env or os.environ.get(ENV_SELECTOR) or None
    if selected is not None and selected not in ENVIRONMENTS:
        origin = "--env" if env else ENV_SELECTOR
        raise _error(
            [(origin, "environment", f"unknown environment {selected!r}; use one of {', '.join(ENVIRONMENTS)}")]
        )
    path = Path(config_file) if config_file is not None else environment_file(selected or "dev")
    source = str(path)
    data = read_config_file(path)

    declared = data.get("environment")
    if selected and config_file is None and declared not in (None, selected):
        raise _error([(source, "environment", f"file declares {declared!r} but {selected!r} was selected")])
    if selected and config_file is not None and declared not in (None, selected):
        raise _error([(source, "environment", f"file declares {declared!r} but --env/MELTICA_ENV says {selected!r}")])
    if declared is None:
        data["environment"] = selected or "dev"
    environment = str(data["environment"])
    override = _env_value("MELTICA_ENVIRONMENT")
    if override is not None and override != environment:
        raise _error(
            [
                (
                    "environment variable MELTICA_ENVIRONMENT",
                    "environment",
                    f"conflicts with the selected environment {environment!r}; select it with {ENV_SELECTOR} or --env",
                )
            ]
        )

    try:
        settings = MelticaSettings(**data)
    except ValidationError as exc:
        raise _error(
            [(_source_of(err["loc"], source), _dotted(err["loc"]), _problem(err)) for err in exc.errors()]
        ) from None

    # registered before the checks below, which look strategies up by name
    use_strategy_directories(settings.strategy_paths)
    found = [*risk_problems(settings), *unsafe_settings(settings)]
    problems = [(_source_of(loc, source), _dotted(loc), problem) for loc, problem in found]
    if problems:
        raise _error(problems)
    return settings


def read_config_file(path: Path) -> dict[str, Any]:
    """The YAML mapping in ``path``; syntax errors carry the line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(
            f"{path}: cannot read configuration file: {exc.strerror or exc}", source=str(path)
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(unknown position)"
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigurationError(
            f"{path}: {where}: YAML syntax error: {problem}",
            source=str(path),
            line=(mark.line + 1) if mark is not None else None,
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path}: YAML syntax error: {exc}", source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigurationError(
            f"{path}: (top level): expected a mapping of settings, got {type(data).__name__}",
            source=str(path),
            field="(top level)",
        )
    bad_keys = [key for key in data if not isinstance(key, str)]
    if bad_keys:
        raise ConfigurationError(
            f"{path}: {bad_keys[0]!r}: setting names must be strings", source=str(path), field=str(bad_keys[0])
        )
    return data


def risk_problems(settings: MelticaSettings) -> list[tuple[tuple[str | int, ...], str]]:
    """Risk overrides that cannot apply — almost always a typo that leaves the real scope unprotected,
    refused like an unknown setting:

    * ``risk.accounts.<a>``: ``a`` must be a configured account (checked when accounts are listed);
    * ``risk.symbols.<s>`` (and ``max_position_notional_by_symbol``): ``s`` must be in ``symbols`` or
      traded by a live instance (``live.instances[].symbols``);
    * ``risk.strategies.<s>``: ``s`` must be a registered strategy name or a live instance id (the
      strategy a live instance's orders carry).
    """
    problems: list[tuple[tuple[str | int, ...], str]] = []
    known = {account.name for account in settings.accounts}
    if known:
        problems.extend(
            (("risk", "accounts", name), f"no configured account is named {name!r} (accounts: {_listed(known)})")
            for name in settings.risk.accounts
            if name not in known
        )
    symbols = set(settings.symbols) | {s for instance in settings.live.instances for s in instance.symbols}
    for field in ("symbols", "max_position_notional_by_symbol"):
        problems.extend(
            (
                ("risk", field, symbol),
                f"{symbol!r} is not a configured symbol (symbols and live instances trade: {_listed(symbols)})",
            )
            for symbol in getattr(settings.risk, field)
            if symbol not in symbols
        )
    strategies = set(list_strategies()) if settings.risk.strategies else set()
    instances = {instance.instance_id for instance in settings.live.instances}
    problems.extend(
        (
            ("risk", "strategies", name),
            f"no registered strategy or live instance is named {name!r} "
            f"(strategies: {_listed(strategies)}; live instances: {_listed(instances)})",
        )
        for name in settings.risk.strategies
        if name not in strategies and name not in instances
    )
    return problems


def _listed(names: set[str]) -> str:
    return ", ".join(sorted(names)) or "none"


def unsafe_settings(settings: MelticaSettings) -> list[tuple[tuple[str | int, ...], str]]:
    """What prod refuses: missing core risk limits (whatever the trading mode: a paper deployment is
    one setting away from live), plain-text credentials and sandbox accounts. Other environments are
    not restricted here. Returns (location, problem)."""
    if settings.environment != "prod":
        return []
    problems: list[tuple[tuple[str | int, ...], str]] = []
    for name in _PROD_RISK_FIELDS:
        if getattr(settings.risk, name) is None:
            problems.append((("risk", name), "required in prod, whatever the trading mode"))
    for index, account in enumerate(settings.accounts):
        if account.sandbox:
            problems.append((("accounts", index, "sandbox"), "sandbox/testnet accounts are not allowed in prod"))
        if account.emulator_url is not None:
            problems.append((("accounts", index, "emulator_url"), "the local exchange emulator is not allowed in prod"))
        for name in _SECRET_FIELDS:
            value = getattr(account, name)
            if value is not None and not is_secret_reference(value):
                problems.append(
                    (
                        ("accounts", index, name),
                        "plain-text secret is not allowed in prod; use env:NAME or encrypted:<token>",
                    )
                )
    return problems


# --- display -----------------------------------------------------------------------------------


def masked_settings(settings: MelticaSettings) -> dict[str, Any]:
    """The effective settings as plain data with every secret masked (for ``meltica config show``)."""
    data: dict[str, Any] = _masked(settings.model_dump(mode="python"))
    data["database_url"] = mask_url(settings.database_url)
    data["database_migration_url"] = mask_url(settings.database_migration_url)
    return data


def mask_url(url: str | SecretStr | None) -> str | None:
    """``scheme://user:****@host/db``: the password hidden, the rest kept for diagnosis."""
    if url is None:
        return None
    text = url.get_secret_value() if isinstance(url, SecretStr) else url
    try:
        parts = urlsplit(text)
        if parts.password is None:
            return text if parts.scheme and "password=" not in parts.query else MASK
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:{MASK}@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return MASK


def _masked(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return describe_secret(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(item) for item in value]
    return value


# --- error reporting ---------------------------------------------------------------------------


def _error(problems: Sequence[tuple[str, str, str]]) -> ConfigurationError:
    lines = [f"{source}: {field}: {problem}" for source, field, problem in problems]
    first_source, first_field, _ = problems[0]
    return ConfigurationError(
        "\n".join(lines), source=first_source, field=first_field, problems=[list(p) for p in problems]
    )


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def _problem(err: Any) -> str:
    kind, msg = err.get("type", ""), str(err.get("msg", "invalid"))
    if kind == "extra_forbidden":
        return "unknown setting (not part of the schema)"
    if kind == "missing":
        return "required"
    return msg.removeprefix("Value error, ")


def _env_value(name: str) -> str | None:
    # pydantic-settings matches MELTICA_* case-insensitively; so does attribution.
    for key, value in os.environ.items():
        if key.upper() == name and value:  # empty ones are ignored, as in MelticaSettings
            return value
    return None


def _source_of(loc: Sequence[str | int], file_source: str) -> str:
    """The environment variable that set ``loc`` (or one of its parents), else the file."""
    names: list[str] = []
    for part in loc:
        if isinstance(part, int):
            break
        names.append(part.upper())
    for end in range(len(names), 0, -1):
        var = "MELTICA_" + "__".join(names[:end])
        if _env_value(var) is not None:
            return f"environment variable {var}"
    return file_source


# --- live trading ----------------------------------------------------------------------------------

LIVE_RISK_FIELDS: tuple[str, ...] = (
    "max_order_notional",
    "max_position_notional",
    "max_gross_exposure",
    "daily_loss_limit",
)
"""Limits every live deployment outside ``dev`` must set (``live_problems``)."""


def live_problems(settings: MelticaSettings) -> list[tuple[tuple[str | int, ...], str]]:
    """What ``meltica live start`` and every live worker refuse before anything starts: no instance, an
    instance on an unknown account or with a strategy that cannot be loaded (or refuses its parameters),
    or — outside ``dev`` — risk limits missing (each one named)."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    live = settings.live
    if not live.instances:
        problems.append((("live", "instances"), "no strategy instance is configured: nothing would trade"))
    known = {account.name for account in settings.accounts}
    listed = ", ".join(sorted(known)) or "none"
    for index, instance in enumerate(live.instances):
        if instance.account not in known:
            problems.append(
                (
                    ("live", "instances", index, "account"),
                    f"no configured account is named {instance.account!r} (accounts: {listed})",
                )
            )

    for index, instance in enumerate(live.instances):
        # a strategy the workers could not load, or parameters it refuses, stop the deployment before it starts
        try:
            validate_params(instance.strategy, instance.params)
        except ConfigurationError as exc:
            problems.append((("live", "instances", index, "strategy"), str(exc)))
    if settings.environment != "dev":
        for name in LIVE_RISK_FIELDS:
            if getattr(settings.risk, name) is None:
                problems.append((("risk", name), f"required to trade live in {settings.environment} (no limit set)"))
    return problems


def check_live(settings: MelticaSettings, source: str = "configuration") -> MelticaSettings:
    """``settings`` unchanged, or ``ConfigurationError`` listing every ``live_problems`` entry."""
    problems = [(source, _dotted(loc), problem) for loc, problem in live_problems(settings)]
    if problems:
        raise _error(problems)
    return settings
