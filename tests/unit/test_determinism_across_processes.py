"""Determinism that a second run in the same process cannot show: the risk engine's decisions and the
matching engine's results over the same inputs are identical in two interpreters started with different
``PYTHONHASHSEED`` values (so set and dict-of-str iteration orders differ between them).

The inputs are drawn once here (hypothesis, derandomised), pickled, and replayed by each child process."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit import test_matching_properties, test_risk_properties

ROOT = Path(__file__).resolve().parents[2]
SEEDS = ("1", "4242")
# Run by each child: load the inputs, call the scenario, print the repr of every result. Also prints the
# iteration order of a set of strings, so the test can check that the two seeds really differ.
CHILD = """
import pickle, sys
from importlib import import_module
module, function, path = sys.argv[1:4]
inputs = pickle.loads(open(path, "rb").read())
scenario = getattr(import_module(module), function)
print(repr(list({"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"})))
for item in inputs:
    print(repr(scenario(*item)))
"""


def draw_inputs(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """``count`` examples of ``strategy``, the same on every run (derandomised, no example database)."""
    drawn: list[Any] = []

    @settings(max_examples=count, derandomize=True, database=None, deadline=None)
    @given(strategy)
    def collect(example: Any) -> None:
        drawn.append(example)

    collect()
    return drawn


def outputs_per_seed(module: str, function: str, inputs: list[tuple[Any, ...]], tmp_path: Path) -> dict[str, str]:
    path = tmp_path / f"{function}.pickle"
    path.write_bytes(pickle.dumps(inputs))
    out = {}
    for seed in SEEDS:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, module, function, str(path)],
            cwd=ROOT,
            env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        out[seed] = done.stdout
    return out


def assert_same_across_seeds(outputs: dict[str, str], expected_lines: int) -> None:
    first, second = (outputs[s].splitlines() for s in SEEDS)
    assert first[0] != second[0], "the hash seeds did not change set iteration order: the check would be hollow"
    assert len(first) == len(second) == expected_lines + 1
    for n, (a, b) in enumerate(zip(first[1:], second[1:], strict=True)):
        assert a == b, f"input {n}: results differ between PYTHONHASHSEED={SEEDS[0]} and {SEEDS[1]}"


def test_risk_decisions_are_the_same_in_two_processes_with_different_hash_seeds(tmp_path: Path) -> None:
    ops = draw_inputs(st.lists(test_risk_properties.op, min_size=5, max_size=40), 30)
    inputs = [(o,) for o in ops]
    outputs = outputs_per_seed("tests.unit.test_risk_properties", "decisions", inputs, tmp_path)
    assert_same_across_seeds(outputs, len(inputs))
    # the scenario reaches both answers, so equal output is not equal emptiness
    assert "(True," in outputs[SEEDS[0]] and "(False," in outputs[SEEDS[0]]


def test_fixed_risk_scenario_is_the_same_in_two_processes(tmp_path: Path) -> None:
    outputs = outputs_per_seed("tests.unit.test_risk_engine", "fixed_scenario_decisions", [()], tmp_path)
    assert_same_across_seeds(outputs, 1)
    assert "(True," in outputs[SEEDS[0]] and "(False," in outputs[SEEDS[0]]


def test_matching_results_are_the_same_in_two_processes_with_different_hash_seeds(tmp_path: Path) -> None:
    ops = draw_inputs(st.lists(test_matching_properties.operations, min_size=3, max_size=25), 30)
    inputs = [(o,) for o in ops]
    outputs = outputs_per_seed("tests.unit.test_matching_properties", "replay", inputs, tmp_path)
    assert_same_across_seeds(outputs, len(inputs))
    assert "fills=(EngineFill(" in outputs[SEEDS[0]]  # some inputs matched: the results are not all empty
