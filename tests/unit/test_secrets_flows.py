"""Every Prefect flow installs the log redaction as its first statement, so a flow run — in whichever
process Prefect starts it — scrubs the secrets it resolves (credentials, the database password)."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import textwrap

import flows


def _flows() -> list[tuple[str, object]]:
    from prefect import Flow

    found = []
    for info in pkgutil.iter_modules(flows.__path__):
        module = importlib.import_module(f"flows.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, Flow) and value.fn.__module__ == module.__name__:
                found.append((f"{module.__name__}.{name}", value))
    return found


def test_every_flow_starts_by_installing_log_redaction() -> None:
    found = _flows()
    assert len(found) >= 6  # backtest, sweep, import-candle-file, ingest, reconcile, daily-risk-report
    for name, value in found:
        tree = ast.parse(textwrap.dedent(inspect.getsource(value.fn)))  # type: ignore[attr-defined]
        body = tree.body[0].body  # type: ignore[attr-defined]
        if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        first = body[0]
        assert isinstance(first, ast.Expr), name
        assert isinstance(first.value, ast.Call), name
        assert ast.unparse(first.value.func) == "scrub_secrets_in_logs", name
