"""Prefect flows: the batch shell around meltica/ (DESIGN.md §2). Flows hold no business rules."""

from pathlib import Path
from typing import Any

# Parameter names whose values are secrets whatever they look like.
_SECRET_NAMES = ("password", "secret", "token", "api_key", "apikey", "private_key", "passphrase")


def scrub_secrets_in_logs() -> None:
    """The first call of every flow: secrets resolved during the run (exchange credentials, the database
    password) are scrubbed from its log records — Prefect's run logs included — and uncaught tracebacks; and
    secret-looking parameters (a URL's password, a value named like a password or key) are masked in the
    copy Prefect stores and shows (:func:`mask_secret_parameters`)."""
    from meltica.secrets import install_log_redaction

    install_log_redaction()
    mask_secret_parameters()


def masked_parameters(value: Any, name: str = "") -> Any:
    """``value`` with every secret-looking part replaced by ``***``: a URL's password, and any value whose
    name (or enclosing key) says it is a password, a secret, a token or a key."""
    from meltica.infra._common import mask_url

    if isinstance(value, str):
        if value and any(word in name.lower() for word in _SECRET_NAMES):
            return "***"
        return mask_url(value) if "://" in value else value
    if isinstance(value, dict):
        return {key: masked_parameters(item, str(key)) for key, item in value.items()}
    if isinstance(value, list):
        return [masked_parameters(item, name) for item in value]
    return value


def mask_secret_parameters() -> None:
    """Rewrite the running flow run's stored parameters with secrets masked (Prefect keeps them in its database
    and shows them in the UI). The run itself already holds the real values; a manual retry of the run from
    the UI gets the masked ones, so pass connection settings through configuration (``MELTICA_DATABASE_URL``,
    ``MELTICA_CONFIG``), never as parameters."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    stored = dict(context.flow_run.parameters or {})
    masked = masked_parameters(stored)
    if masked != stored:
        with get_client(sync_client=True) as client:
            client.update_flow_run(context.flow_run.id, parameters=masked)


def config_file_of(config_file: str | None) -> str | None:
    """The configuration file a flow run reads: its ``config_file`` parameter, else ``MELTICA_CONFIG`` (set
    on the deployments by ``meltica flows deploy --config``), else None (the ``MELTICA_ENV`` file)."""
    import os

    return config_file or os.environ.get("MELTICA_CONFIG") or None


def embedded_png(path: str | Path, alt: str) -> str:
    """Markdown showing the PNG at ``path`` inline (a ``data:`` URI): Prefect's UI displays it with the artifact,
    where a ``file://`` link to the worker's disk opens nothing. A file that is gone (a cached rerun after the
    output was cleaned) is said so instead."""
    from urllib.parse import unquote, urlsplit

    text = str(path)
    png = Path(unquote(urlsplit(text).path)) if text.startswith("file://") else Path(text)
    if not png.is_file():
        return f"_{alt}: the chart file is no longer on the worker ({png.name})_"
    return embedded_png_bytes(png.read_bytes(), alt)


def embedded_png_bytes(png: bytes, alt: str) -> str:
    """Markdown showing the PNG ``png`` inline (a ``data:`` URI)."""
    import base64

    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"
