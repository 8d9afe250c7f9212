"""The layer rules of meltica/LAYERS.md that import-linter does not check: an import inside a function is
an exception that says why (a heavy or optional package, or the start-up time of the `meltica` command)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "meltica"
MODULE_PRAGMA = "# lazy imports:"
"""A module-level comment line that gives the reason for every function-level import of its module."""
REASON = "# lazy:"
"""A comment on the import's line, or on the line just above its block of imports."""


def _function_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: dict[int, ast.Import | ast.ImportFrom] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    found[inner.lineno] = inner
    return [found[line] for line in sorted(found)]


def unexplained_function_imports(source: str) -> list[int]:
    """Line numbers of the function-level imports of ``source`` that carry no reason."""
    lines = source.splitlines()
    if any(line.startswith(MODULE_PRAGMA) for line in lines):
        return []
    imports = _function_imports(ast.parse(source))
    ends = {node.end_lineno for node in imports}
    missing: list[int] = []
    for node in imports:
        first = node.lineno
        while first - 1 in ends:  # the first line of this block of consecutive imports
            first = min(n.lineno for n in imports if n.end_lineno == first - 1)
        explained = REASON in lines[node.lineno - 1] or (first >= 2 and REASON in lines[first - 2])
        if not explained:
            missing.append(node.lineno)
    return missing


def test_every_function_level_import_in_meltica_says_why() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        lines = unexplained_function_imports(path.read_text(encoding="utf-8"))
        offenders.extend(f"{path.relative_to(PACKAGE.parent)}:{line}" for line in lines)
    assert offenders == [], "function-level imports without a '# lazy:' reason:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def f():\n    import json\n", [2]),
        ("def f():\n    import pandas  # lazy: heavy\n", []),
        ("def f():\n    # lazy: heavy plotting stack\n    import matplotlib\n    import plotly\n", []),
        ("def f():\n    # lazy: heavy\n    import matplotlib\n\n    import json\n", [5]),
        ("# lazy imports: commands load what they run\ndef f():\n    import json\n", []),
        ("import json\n\n\ndef f():\n    return json\n", []),
        ("def f():\n    from meltica.backtest import run_backtest\n", [2]),
    ],
)
def test_the_rule_itself(source: str, expected: list[int]) -> None:
    assert unexplained_function_imports(source) == expected
