"""The pre-commit hooks run exactly what CI runs (`make lint typecheck`), and pre-commit itself accepts the file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _make_target(name: str) -> list[str]:
    """The recipe lines of one Makefile target, with ``$(VENV)`` spelled out."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{name}:", line))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip().replace("$(VENV)", ".venv/bin"))
    return recipe


def _hooks() -> dict[str, dict[str, object]]:
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    return {hook["id"]: hook for repo in config["repos"] for hook in repo["hooks"]}


def test_the_commit_hooks_are_the_makefile_checks() -> None:
    on_commit = [str(h["entry"]) for h in _hooks().values() if h.get("stages") == ["pre-commit"]]
    assert on_commit == _make_target("lint") + _make_target("typecheck")


def test_the_push_hook_runs_the_unit_tests() -> None:
    (push,) = [h for h in _hooks().values() if h.get("stages") == ["pre-push"]]
    assert str(push["entry"]).startswith(".venv/bin/pytest tests/unit")
    assert _make_target("unit") == [".venv/bin/pytest tests/unit $(PYTEST_ARGS)"]


def test_pre_commit_accepts_the_configuration() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pre_commit", "validate-config", ".pre-commit-config.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
