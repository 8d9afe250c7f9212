"""The docs cannot drift from the CLI: every shell command of README.md and docs/ is either a ``meltica``
command whose subcommand and options the real CLI accepts (parsed by click, not run), or a command of
another tool listed here with why; README's Python snippets run as written.

The commands that do run end to end are tested elsewhere: the guide's (tests/integration/test_own_strategies.py),
``make demo``'s steps (the demo tests) and the paper run."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer._click.exceptions import UsageError  # Typer ships its own click

from meltica.cli import app

REPO = Path(__file__).resolve().parents[1].parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]

# Other tools' commands the docs show, each run elsewhere or needing a server this suite does not start here.
OTHER_TOOLS = {
    "make": "the Makefile's targets (make test is CI itself; make demo: tests of the demo)",
    "export": "a shell variable for the commands after it",
    "prefect": "Prefect's own CLI against a running server (tests/integration Prefect tests start one)",
    "python": "a module run directly (documented with its own --help)",
}


def shell_commands() -> list[tuple[str, str]]:
    """(document, command) for every line of every sh/bash block, continuations joined, comments dropped."""
    found: list[tuple[str, str]] = []
    for document in DOCUMENTS:
        for block in re.findall(r"```(?:sh|bash|shell)\n(.*?)```", document.read_text(), re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                command = line.split("  #")[0].split(" # ")[0].strip()
                if command and not command.startswith("#"):
                    found.append((document.relative_to(REPO).as_posix(), command))
    return found


def parse(argv: list[str]) -> None:
    """Resolve the subcommand chain and parse its options exactly as ``meltica`` would, without running it."""
    command: Any = typer.main.get_command(app)
    parent: Any = None
    name = "meltica"
    while True:
        context = command.make_context(name, list(argv), parent=parent)
        if not hasattr(command, "resolve_command"):  # a command, not a group: its options are parsed
            return
        rest = [*context._protected_args, *context.args]
        if not rest:
            return
        name, command, argv = command.resolve_command(context, rest)
        parent = context


COMMANDS = shell_commands()


def test_the_docs_show_commands() -> None:
    assert len([c for _, c in COMMANDS if "meltica" in c.split()[0]]) >= 25


@pytest.mark.parametrize(("document", "command"), COMMANDS, ids=[c[:60] for _, c in COMMANDS])
def test_every_documented_command_is_accepted(document: str, command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the README's paths are the checkout's
    words = shlex.split(command)
    while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value before the command
        words = words[1:]
    program = Path(words[0]).name
    if program == "meltica":
        try:
            parse(words[1:])
        except typer.Exit:
            pass  # --help
        except UsageError as exc:
            pytest.fail(f"{document}: `{command}` is refused by the CLI: {exc.format_message()}")
    else:
        assert program in OTHER_TOOLS, f"{document}: `{command}`: a command this test does not know how to check"


def test_readme_python_snippets_run_as_written(tmp_path: Path) -> None:
    snippets = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert snippets
    for index, snippet in enumerate(snippets):
        script = tmp_path / f"readme_{index}.py"
        script.write_text(snippet)
        proc = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False, cwd=REPO
        )
        assert proc.returncode == 0, f"README python snippet {index}:\n{snippet}\n{proc.stderr}"
