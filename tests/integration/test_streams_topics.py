"""`meltica streams topics create|list` against the real broker: every catalogue topic with its
partitions and retention/compaction, idempotent on a second run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from meltica.infra.kafka import KafkaEndpoint
from meltica.messaging import Catalogue
from meltica.messaging.admin import create_topics, describe_topics, spec_matches

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _meltica(bootstrap: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MELTICA_KAFKA_BOOTSTRAP": bootstrap, "MELTICA_TOPIC_PREFIX": prefix}
    return subprocess.run(
        [sys.executable, "-m", "meltica", "streams", "topics", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_creates_every_catalogue_topic_idempotently(
    kafka_endpoint: KafkaEndpoint, unique_name: Callable[[str], str]
) -> None:
    bootstrap = kafka_endpoint.bootstrap_servers
    prefix = unique_name("t") + "."
    catalogue = Catalogue(prefix=prefix)
    names = catalogue.physical_names()

    before = _meltica(bootstrap, prefix, "list", "--json")
    assert before.returncode == 0, before.stderr
    assert not any(row["exists"] for row in json.loads(before.stdout))

    first = _meltica(bootstrap, prefix, "create")
    assert first.returncode == 0, first.stderr
    assert f"{len(names)} created, 0 already existed" in first.stdout
    for name in names:
        assert f"created  {name}" in first.stdout

    info = describe_topics(bootstrap, names)
    assert set(info) == set(names)
    for spec in catalogue:
        have = info[catalogue.topic_name(spec.name)]
        assert have.partitions == spec.partitions, spec.name
        assert have.replication == 1
        assert spec_matches(spec, have) == [], spec.name
    assert info[catalogue.topic_name("positions")].configs["cleanup.policy"] == "compact"
    assert info[catalogue.topic_name("control")].partitions == 1

    second = _meltica(bootstrap, prefix, "create")
    assert second.returncode == 0, second.stderr
    assert f"0 created, {len(names)} already existed" in second.stdout

    listed = _meltica(bootstrap, prefix, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [row["topic"] for row in rows] == names
    assert all(row["exists"] and row["drift"] == [] for row in rows)


def test_admin_reports_existing_and_drift(kafka_endpoint: KafkaEndpoint, unique_name: Callable[[str], str]) -> None:
    bootstrap = kafka_endpoint.bootstrap_servers
    catalogue = Catalogue(prefix=unique_name("t") + ".")
    trades = catalogue.topic_name("md.trades")
    # someone made md.trades by hand with the wrong partition count
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="meltica-test-admin")
    try:
        admin.create_topics({trades: {"num_partitions": 2, "replication_factor": 1}})
    finally:
        admin.close()

    result = create_topics(bootstrap, catalogue)
    assert result.existing == [trades]
    assert sorted(result.created) == sorted(n for n in catalogue.physical_names() if n != trades)
    info = describe_topics(bootstrap, [trades])
    problems = spec_matches(catalogue.spec("md.trades"), info[trades])
    assert "partitions 2 != 6" in problems


def test_unreachable_broker_is_one_clear_error(unique_name: Callable[[str], str], free_port: Callable[[], int]) -> None:
    env_prefix = unique_name("t") + "."
    env = {
        **os.environ,
        "MELTICA_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "MELTICA_TOPIC_PREFIX": env_prefix,
    }
    done = subprocess.run(
        [sys.executable, "-m", "meltica", "streams", "topics", "create", "--timeout", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "cannot reach Kafka" in done.stderr
    assert "Traceback" not in done.stderr
