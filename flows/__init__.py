"""Prefect flows: the batch shell around meltica/ (DESIGN.md §2). Flows hold no business rules."""


def scrub_secrets_in_logs() -> None:
    """The first call of every flow: secrets resolved during the run (exchange credentials, the database
    password) are scrubbed from its log records — Prefect's run logs included — and uncaught tracebacks."""
    from meltica.secrets import install_log_redaction

    install_log_redaction()
