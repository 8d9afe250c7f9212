"""The mutation score of the last ``make mutation`` run (``mutants/mutmut-cicd-stats.json``, written by
``mutmut export-cicd-stats``).

Score = killed (a test failed, or the mutant timed out) / mutants that were tested. Mutants that no
selected test reaches ("no tests") are counted apart: they are gaps of the test selection, not survivors.
The goal is >= 80 %.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STATS = Path("mutants/mutmut-cicd-stats.json")
GOAL = 80.0


def main() -> int:
    stats = json.loads(STATS.read_text())
    killed = stats["killed"] + stats["timeout"]
    tested = killed + stats["survived"] + stats["suspicious"] + stats["segfault"]
    score = 100.0 * killed / tested if tested else 0.0
    print(
        f"mutation score {score:.1f} % ({killed} killed of {tested} tested; {stats['survived']} survived, "
        f"{stats['no_tests']} reached by no selected test, {stats['skipped']} skipped) — goal {GOAL:.0f} %"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
