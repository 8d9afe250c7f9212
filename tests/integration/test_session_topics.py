"""Which Kafka topics a test run made, with several pytest-xdist workers that reached the broker at different
times (tests/session_topics.py): a topic one worker made before another worker started is the run's too, and a
topic that existed before every worker started is not."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from meltica.infra.kafka import KafkaEndpoint
from tests.session_topics import KEEP_TOPICS_ENV, delete_made, made_during, record_before

pytestmark = pytest.mark.integration


@pytest.fixture
def admin(kafka_endpoint: KafkaEndpoint) -> Iterator[KafkaAdminClient]:
    client = KafkaAdminClient(bootstrap_servers=kafka_endpoint.bootstrap_servers, request_timeout_ms=30_000)
    yield client
    client.close()


def create(admin: KafkaAdminClient, *names: str) -> None:
    """Create topics and wait until the broker lists them (its metadata catches up just after the create)."""
    admin.create_topics([NewTopic(name=name, num_partitions=1, replication_factor=1) for name in names])
    deadline = time.monotonic() + 30
    while not set(names) <= set(admin.list_topics()):
        assert time.monotonic() < deadline, f"the broker does not list {names} 30 s after creating them"
        time.sleep(0.1)


def test_topics_made_by_any_worker_during_the_run_are_the_runs_own(
    tmp_path: Path, kafka_endpoint: KafkaEndpoint, admin: KafkaAdminClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    bootstrap = kafka_endpoint.bootstrap_servers
    run = uuid.uuid4().hex[:12]
    unhex = "".join(chr(ord("g") + int(c, 16)) for c in run)  # unique, yet no hex run: g…v
    older, first, second, plain = (f"st-older-{run}", f"st-gw0-{run}", f"st-gw1-{run}", f"st-plain-{unhex}")
    names = [older, first, second, plain]
    try:
        create(admin, older)
        record_before(tmp_path, "gw0", bootstrap)  # the first worker reaches the broker
        create(admin, first)
        record_before(tmp_path, "gw1", bootstrap)  # the second one, after gw0 made a topic
        create(admin, second, plain)

        made = made_during(tmp_path)
        assert made is not None
        assert made[0] == bootstrap
        assert first in made[1] and second in made[1]  # gw0's topic is in gw1's starting set, not in gw0's
        assert older not in made[1]  # there before every worker started
        assert plain not in made[1]  # no run-specific hex name: never deleted

        monkeypatch.setenv(KEEP_TOPICS_ENV, "1")
        kept = delete_made(tmp_path)  # other sessions on the shared broker may have made topics meanwhile
        assert kept is not None and re.fullmatch(
            rf"kept the \d+ Kafka topics this run made \({KEEP_TOPICS_ENV}=1\)", kept
        )
        assert {first, second} <= set(admin.list_topics())
    finally:
        admin.delete_topics([n for n in names if n in admin.list_topics()])


def test_nothing_is_deleted_when_a_worker_could_not_list_the_topics(
    tmp_path: Path, kafka_endpoint: KafkaEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEEP_TOPICS_ENV, raising=False)
    assert made_during(tmp_path) is None  # no worker reached a broker
    record_before(tmp_path, "gw0", kafka_endpoint.bootstrap_servers)
    (tmp_path / "before-gw1.json").write_text(
        json.dumps({"bootstrap": kafka_endpoint.bootstrap_servers, "before": None})
    )
    assert made_during(tmp_path) is None  # which topics are new is unknown
    assert delete_made(tmp_path) is None
