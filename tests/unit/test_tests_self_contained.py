"""The test suite runs from a plain clone: it reads its data from ``tests/data`` and nothing beside the checkout."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
DATA = TESTS / "data"

# a path into a folder beside the checkout (``<checkout>/../shared``) or an absolute path on one machine
OUTSIDE = re.compile(r"""["'/]shared["'/]|["']/work/""")


def test_no_test_reads_outside_the_checkout() -> None:
    offenders = [
        f"{path.relative_to(TESTS)}:{number}: {line.strip()}"
        for path in sorted(TESTS.rglob("*.py"))
        if path != Path(__file__).resolve()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert offenders == []


def test_every_shipped_sample_is_described_in_the_provenance_readme() -> None:
    readme = (DATA / "README.md").read_text()
    files = [p for p in DATA.rglob("*") if p.is_file() and p.name != "README.md"]
    assert files
    for path in files:
        relative = path.relative_to(DATA).as_posix()
        described = relative in readme or f"{path.parent.name}/*{path.suffix}" in readme or path.name in readme
        assert described, f"{relative} has no provenance row in tests/data/README.md"
