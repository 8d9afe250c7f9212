"""Prefect flows: the batch shell around meltica/ (DESIGN.md §2). Flows hold no business rules."""


def scrub_secrets_in_logs() -> None:
    """The first call of every flow: secrets resolved during the run (exchange credentials, the database
    password) are scrubbed from its log records — Prefect's run logs included — and uncaught tracebacks."""
    from meltica.secrets import install_log_redaction

    install_log_redaction()


def config_file_of(config_file: str | None) -> str | None:
    """The configuration file a flow run reads: its ``config_file`` parameter, else ``MELTICA_CONFIG`` (set
    on the deployments by ``meltica flows deploy --config``), else None (the ``MELTICA_ENV`` file)."""
    import os

    return config_file or os.environ.get("MELTICA_CONFIG") or None
