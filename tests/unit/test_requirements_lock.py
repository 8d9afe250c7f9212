"""The locked dependency set is installed with hash checking: every pin carries its sha256 and every install
command (bootstrap, the Docker image) refuses a file whose hash is not in requirements.lock."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"


def lock_entries() -> dict[str, tuple[str, list[str]]]:
    """name -> (requirement line, its --hash options), continuation lines joined."""
    logical: list[str] = []
    for raw in LOCK.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if logical and logical[-1].endswith("\\"):
            logical[-1] = logical[-1][:-1].rstrip() + " " + line
        else:
            logical.append(line)
    entries: dict[str, tuple[str, list[str]]] = {}
    for line in logical:
        words = shlex.split(line)
        requirement = words[0]
        hashes = [word for word in words[1:] if word.startswith("--hash=")]
        entries[Requirement(requirement).name.lower()] = (requirement, hashes)
    return entries


def shell_lines(path: Path) -> list[str]:
    """Logical command lines of a shell script / Dockerfile / Makefile (backslash continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", path.read_text(encoding="utf-8"))
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_every_locked_requirement_is_pinned_and_hashed() -> None:
    entries = lock_entries()
    assert len(entries) > 100  # the whole resolved set, not a stub
    for name, (requirement, hashes) in entries.items():
        assert re.fullmatch(r"[A-Za-z0-9._-]+(\[[A-Za-z0-9._,-]+\])?==[A-Za-z0-9.+!-]+", requirement), requirement
        assert hashes, f"{name} has no --hash"
        for option in hashes:
            assert re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", option), (name, option)


def test_lock_covers_the_build_backend_of_the_project() -> None:
    """The editable install runs without build isolation, so the backend must come from the hashed lock."""
    entries = lock_entries()
    build_requires = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]["requires"]
    for text in build_requires:
        wanted = Requirement(text)
        assert wanted.name.lower() in entries, f"build requirement {text} is not locked"
        pinned = entries[wanted.name.lower()][0].split("==", 1)[1]
        assert wanted.specifier.contains(pinned, prereleases=True), (text, pinned)


def test_lock_target_writes_hashes() -> None:
    lock_commands = [line for line in shell_lines(ROOT / "Makefile") if "pip compile" in line]
    assert len(lock_commands) == 1
    words = shlex.split(lock_commands[0])
    assert "--generate-hashes" in words
    assert "requirements-build.in" in words
    assert words[words.index("-o") + 1] == "requirements.lock"


def test_bootstrap_installs_the_lock_with_hash_checking() -> None:
    lines = shell_lines(ROOT / "infra" / "bootstrap.sh")
    syncs = [line for line in lines if "requirements.lock" in line and " pip " in f" {line} "]
    assert len(syncs) == 1, syncs
    sync = shlex.split(syncs[0])
    assert "sync" in sync
    assert "--require-hashes" in sync
    # Wheels only: an sdist build would fetch its build backend without hashes.
    assert "--no-build" in sync
    project = [line for line in lines if line.rstrip().endswith("-e .")]
    assert len(project) == 1, project
    assert {"--no-deps", "--no-build-isolation"} <= set(shlex.split(project[0]))


def test_docker_image_installs_the_lock_with_hash_checking() -> None:
    runs = [line for line in shell_lines(ROOT / "infra" / "Dockerfile") if line.startswith("RUN pip install")]
    locked = [shlex.split(line) for line in runs if "requirements.lock" in line]
    assert len(locked) == 1
    assert {"--require-hashes", "--no-deps", "--only-binary"} <= set(locked[0])
    assert "pip check" in " ".join(locked[0])
    project = [shlex.split(line) for line in runs if "requirements.lock" not in line]
    assert project
    assert all({"--no-deps", "--no-build-isolation"} <= set(words) for words in project)
