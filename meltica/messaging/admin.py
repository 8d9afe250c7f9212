"""Create and describe the catalogue's topics with kafka-python's ``KafkaAdminClient`` (no Faust here:
``meltica/`` must not import it). Idempotent: topics that exist are left alone and reported."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from meltica.errors import InfrastructureError
from meltica.infra.kafka import ensure_kafka
from meltica.messaging.catalogue import Catalogue, TopicSpec

BOOTSTRAP_ENV = "MELTICA_KAFKA_BOOTSTRAP"
_CLIENT_ID = "meltica-admin"


@dataclass(frozen=True, slots=True)
class CreateResult:
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TopicInfo:
    name: str
    partitions: int
    replication: int
    configs: dict[str, str]


def default_bootstrap() -> str:
    """``MELTICA_KAFKA_BOOTSTRAP``, else the local dev broker (``meltica infra``), started if needed."""
    value = os.environ.get(BOOTSTRAP_ENV)
    if value:
        return value

    return ensure_kafka().bootstrap_servers


def admin_client(bootstrap: str, timeout_ms: int) -> Any:
    """An admin client; ``timeout_ms`` bounds both the first connection (bootstrap) and each request."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # kafka-python 3 read_text on import
        # lazy: kafka-python (about 0.4 s, and a DeprecationWarning on import) only when topics are administered
        from kafka import KafkaAdminClient

    try:
        return KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id=_CLIENT_ID,
            request_timeout_ms=timeout_ms,
            bootstrap_timeout_ms=timeout_ms,
        )
    except Exception as exc:
        raise InfrastructureError(f"cannot reach Kafka at {bootstrap}: {exc}", reason="kafka_unreachable") from exc


def create_topics(
    bootstrap: str, catalogue: Catalogue, replication: int = 1, *, timeout_ms: int = 30_000
) -> CreateResult:
    """Create every catalogue topic that does not exist (partitions and configs from the spec)."""
    # lazy: kafka-python (about 0.4 s, and a DeprecationWarning on import) only when topics are administered
    from kafka.errors import TopicAlreadyExistsError

    admin = admin_client(bootstrap, timeout_ms)
    try:
        present = set(admin.list_topics())
        wanted = {catalogue.topic_name(spec.name): spec for spec in catalogue}
        missing = {name: spec for name, spec in wanted.items() if name not in present}
        created: list[str] = []
        existing = sorted(name for name in wanted if name in present)
        if missing:
            request = {
                name: {
                    "num_partitions": spec.partitions,
                    "replication_factor": replication,
                    "configs": spec.topic_configs(),
                }
                for name, spec in missing.items()
            }
            response = admin.create_topics(request, timeout_ms=timeout_ms, raise_errors=False)
            for topic in response["topics"]:
                error = topic.get("error_code", 0)
                if error == 0:
                    created.append(topic["name"])
                elif error == TopicAlreadyExistsError.errno:  # created concurrently
                    existing.append(topic["name"])
                else:
                    raise InfrastructureError(
                        f"creating topic {topic['name']} failed: error {error} {topic.get('error_message')}",
                        reason="kafka_create_topic",
                    )
            if created:
                admin.wait_for_topics(created, timeout_ms=timeout_ms)
        return CreateResult(created=sorted(created), existing=sorted(existing))
    finally:
        admin.close()


def describe_topics(bootstrap: str, names: Iterable[str], *, timeout_ms: int = 30_000) -> dict[str, TopicInfo]:
    """Partitions, replication and the non-default configs of existing topics (missing ones are left out)."""
    # lazy: kafka-python (about 0.4 s, and a DeprecationWarning on import) only when topics are administered
    from kafka.admin import ConfigResource, ConfigResourceType

    names = list(names)
    admin = admin_client(bootstrap, timeout_ms)
    try:
        present = set(admin.list_topics())
        names = [name for name in names if name in present]
        if not names:
            return {}
        metadata = admin.describe_topics(names)
        raw_configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name) for name in names])
    finally:
        admin.close()
    configs = _flatten_configs(raw_configs)
    result: dict[str, TopicInfo] = {}
    for topic in metadata:
        if topic.get("error_code", 0) != 0:
            continue
        partitions = topic["partitions"]
        result[topic["name"]] = TopicInfo(
            name=topic["name"],
            partitions=len(partitions),
            replication=max((len(p["replica_nodes"]) for p in partitions), default=0),
            configs=configs.get(topic["name"], {}),
        )
    return result


def _flatten_configs(raw: Any) -> dict[str, dict[str, str]]:
    """kafka-python 3 returns ``{resource_type: {name: {key: {value...}}}}``; keep ``{name: {key: value}}``."""
    out: dict[str, dict[str, str]] = {}
    if not isinstance(raw, dict):
        return out
    for per_type in raw.values():
        if not isinstance(per_type, dict):
            continue
        for name, entries in per_type.items():
            flat: dict[str, str] = {}
            for key, entry in (entries or {}).items():
                value = entry.get("value") if isinstance(entry, dict) else entry
                if value is not None:
                    flat[str(key)] = str(value)
            out[str(name)] = flat
    return out


def spec_matches(spec: TopicSpec, info: TopicInfo) -> list[str]:
    """Differences between what the catalogue asks for and what the broker has (empty: in line)."""
    problems = []
    if info.partitions != spec.partitions:
        problems.append(f"partitions {info.partitions} != {spec.partitions}")
    for key, value in spec.topic_configs().items():
        if info.configs.get(key) != value:
            problems.append(f"{key} {info.configs.get(key)!r} != {value!r}")
    return problems
