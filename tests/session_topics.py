"""The Kafka topics one test run made, deleted once at the very end of the run.

The broker keeps every partition's files open, and the topics of a few full runs exhaust its open-files limit
("Too many open files": it stops accepting connections), so a run deletes what it made. Under pytest-xdist
each worker's ``kafka_endpoint`` fixture records the topics that existed when it first reached the broker
(:func:`record_before`); only the main process deletes, after every worker has finished
(:func:`delete_made`): a worker that deleted at its own end would pull topics from under tests another worker
is still running. Deleted: topics present at the end, absent from at least one worker's starting set (so
made during the run), with a run-specific hex name (uuid-based prefixes, app ids, group names).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import pytest

# A name made for one test run: a hex run of 8+ characters.
TEST_NAME = re.compile(r"[0-9a-f]{8,}")
KEEP_TOPICS_ENV = "MELTICA_TEST_KEEP_TOPICS"
# The run's folder for the workers' starting sets: made by the main process (tests/conftest.py), handed to
# each xdist worker in its ``workerinput``.
RUN_DIR = pytest.StashKey[Path]()
RUN_DIR_INPUT = "meltica_run_dir"


def worker_id() -> str:
    """``gw0``, ``gw1`` … under pytest-xdist; ``main`` in a serial run."""
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def run_dir(config: pytest.Config) -> Path:
    return config.stash[RUN_DIR]


def topics(bootstrap: str) -> set[str] | None:
    """The broker's topic names, or None when it cannot be asked."""
    from kafka import KafkaAdminClient

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    except Exception:
        return None
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def record_before(run_dir: Path, worker: str, bootstrap: str) -> None:
    """Write the topics on ``bootstrap`` now, as ``worker``'s starting set (None: unknown, delete nothing)."""
    before = topics(bootstrap)
    record = {"bootstrap": bootstrap, "before": None if before is None else sorted(before)}
    (run_dir / f"before-{worker}.json").write_text(json.dumps(record))


def made_during(run_dir: Path) -> tuple[str, list[str]] | None:
    """``(bootstrap, names)`` of the topics the run made, or None when that is unknown (no worker reached a
    broker, or one could not list its topics)."""
    records = [json.loads(path.read_text()) for path in sorted(run_dir.glob("before-*.json"))]
    if not records or any(record["before"] is None for record in records):
        return None
    bootstraps = {record["bootstrap"] for record in records}
    if len(bootstraps) != 1:
        return None  # workers on different brokers: never the case in this suite
    (bootstrap,) = bootstraps
    existed = set.intersection(*(set(record["before"]) for record in records))
    after = topics(bootstrap)
    if after is None:
        return None
    return bootstrap, sorted(name for name in after - existed if TEST_NAME.search(name))


def delete_made(run_dir: Path) -> str | None:
    """Delete the topics the run made (unless ``MELTICA_TEST_KEEP_TOPICS=1``); a line saying what was done."""
    made = made_during(run_dir)
    if made is None:
        return None
    bootstrap, names = made
    if os.environ.get(KEEP_TOPICS_ENV) == "1":
        return f"kept the {len(names)} Kafka topics this run made ({KEEP_TOPICS_ENV}=1)"
    if names:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=60_000)
        try:
            for start in range(0, len(names), 200):
                with contextlib.suppress(Exception):  # cleanup only: a topic already gone is fine
                    admin.delete_topics(names[start : start + 200], timeout_ms=60_000)
        finally:
            admin.close()
    return f"deleted the {len(names)} Kafka topics this run made"
