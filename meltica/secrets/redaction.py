"""Scrub known secret values from log records.

Adapters register each secret they resolve (:func:`register_secret`); :func:`install_log_redaction` makes every
log record created afterwards — whichever logger, handler or formatter deals with it — carry ``****`` instead of
a registered value, in its message, its arguments and its formatted exception and stack text.
:class:`RedactingFilter` does the same as a handler filter, for handlers configured by hand.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from pydantic import SecretStr

MASK = "****"
# Shorter values would turn ordinary words into masks; real API keys and secrets are far longer.
MIN_SECRET_LENGTH = 6


class SecretRegistry:
    """The set of values to scrub. Thread-safe; values are kept only in memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: frozenset[str] = frozenset()

    def add(self, value: str | SecretStr | None) -> None:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not text or len(text) < MIN_SECRET_LENGTH:
            return
        with self._lock:
            self._values = self._values | {text}

    def discard(self, value: str | SecretStr) -> None:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        with self._lock:
            self._values = self._values - {text}

    def clear(self) -> None:
        with self._lock:
            self._values = frozenset()

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"SecretRegistry({len(self._values)} value(s))"

    def redact(self, text: str) -> str:
        values = self._values
        if not values or not text:
            return text
        # Longest first, so a secret that contains another is masked whole.
        for value in sorted(values, key=len, reverse=True):
            if value in text:
                text = text.replace(value, MASK)
        return text


registry = SecretRegistry()


def register_secret(*values: str | SecretStr | None) -> None:
    """Mask these values in every log record from now on (values shorter than 6 characters are ignored)."""
    for value in values:
        registry.add(value)


def register_secrets(values: Iterable[str | SecretStr | None]) -> None:
    register_secret(*values)


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``****``."""
    return registry.redact(text)


def redact_record(record: logging.LogRecord, secrets: SecretRegistry | None = None) -> logging.LogRecord:
    """Scrub ``record`` in place: message (with its arguments merged), exception and stack text."""
    reg = registry if secrets is None else secrets
    if not len(reg):
        return record
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: fall back to the raw parts
        message = f"{record.msg} {record.args}"
    cleaned = reg.redact(message)
    if cleaned != message:
        record.msg = cleaned
        record.args = None
    if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        cleaned_exc = reg.redact(record.exc_text)
        if cleaned_exc != record.exc_text:
            record.exc_text = cleaned_exc
            # A formatter that formats exc_info itself (instead of reusing exc_text) would print the secret.
            record.exc_info = None
    if record.stack_info:
        record.stack_info = reg.redact(record.stack_info)
    return record


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs registered secrets from each record (and never drops one)."""

    def __init__(self, name: str = "", secrets: SecretRegistry | None = None) -> None:
        super().__init__(name)
        self._secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record, self._secrets)
        return True


_install_lock = threading.Lock()
_installed_factory: Callable[..., logging.LogRecord] | None = None


def print_exception_redacted(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None = None
) -> None:
    """Print ``exc``'s traceback to stderr, as Python does for an uncaught one, without registered secrets."""
    text = "".join(traceback.format_exception(exc_type, exc, tb))  # causes and contexts included
    sys.stderr.write(registry.redact(text))
    sys.stderr.flush()


def _redacting_thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    sys.stderr.write(registry.redact(f"Exception in thread {name}:\n{text}"))
    sys.stderr.flush()


def install_log_redaction(*handlers: logging.Handler) -> None:
    """Scrub registered secrets from every log record, process-wide. Idempotent.

    Wraps the log record factory (so records of every logger are clean before any handler sees them), adds a
    :class:`RedactingFilter` to the root logger's handlers and to ``handlers``, and replaces the hooks that
    print uncaught exceptions (main thread and other threads), so a traceback — its causes and contexts
    included — never shows a registered value either.
    """
    global _installed_factory
    sys.excepthook = print_exception_redacted
    threading.excepthook = _redacting_thread_excepthook
    with _install_lock:
        current = logging.getLogRecordFactory()
        if current is not _installed_factory:
            base = current

            def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
                return redact_record(base(*args, **kwargs))

            logging.setLogRecordFactory(factory)
            _installed_factory = factory
    for handler in (*logging.getLogger().handlers, *handlers):
        if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
            handler.addFilter(RedactingFilter())
