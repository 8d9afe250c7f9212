"""The guide docs/strategies/writing-a-strategy.md: its Python snippets run as written, in a fresh interpreter
(each snippet defines or imports everything it uses; the second continues the first)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from meltica.strategies.registry import ENTRY_POINT_GROUP

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "strategies" / "writing-a-strategy.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), re.S)


def test_python_snippets_run_as_written(tmp_path: Path) -> None:
    snippets = blocks("python")
    assert len(snippets) >= 2
    script = tmp_path / "guide.py"
    script.write_text("\n\n".join(snippets))
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "fill_count=" in proc.stdout  # the run printed its position


def test_entry_point_snippet_names_the_group_meltica_reads() -> None:
    (snippet,) = blocks("toml")
    declared = tomllib.loads(snippet)["project"]["entry-points"]
    assert list(declared) == [ENTRY_POINT_GROUP]
