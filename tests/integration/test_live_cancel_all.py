"""Cancel-all on stop (``CancelAllOnStop``, the ``before_stop`` step of ``meltica live start
--cancel-all-on-stop``) on the real broker and database: one halt per traded account on the deployment's
control topic, then a wait until the database shows none of their orders open. A thread plays the
execution stage: it reads the control topic and cancels through the OrderStore, as the OMS would."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine

from meltica.config.settings import MelticaSettings
from meltica.domain import Side
from meltica.domain.orders import OrderCancelled
from meltica.execution import OrderStore
from meltica.infra.kafka import KafkaEndpoint
from meltica.live.live_status import open_orders
from meltica.live.supervisor import CancelAllOnStop
from meltica.messaging.admin import create_topics
from meltica.messaging.catalogue import Catalogue
from meltica.messaging.codec import Codec
from meltica.messaging.schemas import KillSwitchCommand
from tests.integration.test_live_status import T0, delete_topics, make_intent, stored_order

pytestmark = pytest.mark.integration


def deployment(prefix: str) -> MelticaSettings:
    return MelticaSettings(
        environment="dev",
        accounts=[{"name": "acct-a", "exchange": "binance"}, {"name": "acct-b", "exchange": "binance"}],
        live={
            "topic_prefix": prefix,
            "instances": [
                {"instance_id": "mom-a", "strategy": "momentum", "account": "acct-a", "symbols": ["BTC/USDT"]},
                {"instance_id": "mom-b", "strategy": "momentum", "account": "acct-b", "symbols": ["BTC/USDT"]},
            ],
        },
    )


class ExecutionStandIn(threading.Thread):
    """Reads the control topic; on a halt of ``account:X`` cancels X's open orders in the database."""

    def __init__(self, bootstrap: str, catalogue: Catalogue, store: OrderStore) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.catalogue, self.store = bootstrap, catalogue, store
        self.commands: list[KillSwitchCommand] = []
        self.ready = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from kafka import KafkaConsumer, TopicPartition

        codec = Codec(self.catalogue)
        topic = self.catalogue.topic_name("control")
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            consumer.seek_to_beginning(tp)
            consumer.position(tp)
            self.ready.set()
            while not self.done.is_set():
                for records in consumer.poll(timeout_ms=100).values():
                    for message in records:
                        command: Any = codec.decode("control", message.value)
                        assert isinstance(command, KillSwitchCommand)
                        self.commands.append(command)
                        account = command.scope.removeprefix("account:")
                        for order in self.store.load_open(account):
                            event = OrderCancelled(event_id="cancel", client_order_id=order.client_order_id, ts=T0)
                            self.store.append_event(order.apply(event), event)
        finally:
            consumer.close()


@pytest.fixture
def topics(kafka_endpoint: KafkaEndpoint, unique_name: Callable[[str], str]) -> Iterator[Catalogue]:
    catalogue = Catalogue(prefix=unique_name("cancelall") + ".")
    create_topics(kafka_endpoint.bootstrap_servers, catalogue)
    yield catalogue
    delete_topics(kafka_endpoint.bootstrap_servers, catalogue.prefix)


def test_cancel_all_halts_each_traded_account_and_waits_for_the_cancels(
    fresh_database: Engine, kafka_endpoint: KafkaEndpoint, topics: Catalogue
) -> None:
    store = OrderStore(fresh_database)
    for account, price in (("acct-a", "90"), ("acct-a", "91"), ("acct-b", "92")):
        stored_order(store, make_intent(account, "mom", "BTC/USDT", Side.BUY, "0.1", price), accepted=True)
    outsider = stored_order(store, make_intent("elsewhere", "x", "BTC/USDT", Side.BUY, "0.1", "93"), accepted=True)
    stage = ExecutionStandIn(kafka_endpoint.bootstrap_servers, topics, store)
    stage.start()
    assert stage.ready.wait(30)
    said: list[str] = []
    try:
        ok = CancelAllOnStop(
            deployment(topics.prefix), fresh_database, kafka_endpoint.bootstrap_servers, deadline_s=30, say=said.append
        )()
    finally:
        stage.done.set()
        stage.join(30)
    assert ok, said
    assert sorted(c.scope for c in stage.commands) == ["account:acct-a", "account:acct-b"]
    assert {(c.mode, c.reason, c.actor) for c in stage.commands} == {("halt", "live stop: cancel all", "meltica live")}
    assert open_orders(fresh_database, ["acct-a", "acct-b"]) == []
    assert [r["client_order_id"] for r in open_orders(fresh_database, ["elsewhere"])] == [outsider.client_order_id]
    assert "cancel all: no open order left on acct-a, acct-b" in said


def test_cancel_all_says_what_is_still_open_at_the_deadline(
    fresh_database: Engine, kafka_endpoint: KafkaEndpoint, topics: Catalogue
) -> None:
    store = OrderStore(fresh_database)
    left = stored_order(store, make_intent("acct-b", "mom", "BTC/USDT", Side.SELL, "0.3", "130"), accepted=True)
    said: list[str] = []
    ok = CancelAllOnStop(
        deployment(topics.prefix), fresh_database, kafka_endpoint.bootstrap_servers, deadline_s=0.5, say=said.append
    )()
    assert ok is False
    assert "CANCEL ALL INCOMPLETE: 1 order(s) still open after 0.5s:" in said
    assert any(left.client_order_id in line and "acct-b BTC/USDT sell 0.3" in line for line in said)


def test_cancel_all_fails_loudly_when_the_control_topic_is_missing(
    fresh_database: Engine, kafka_endpoint: KafkaEndpoint, unique_name: Callable[[str], str]
) -> None:
    said: list[str] = []
    ok = CancelAllOnStop(
        deployment(unique_name("nowhere") + "."), fresh_database, kafka_endpoint.bootstrap_servers, say=said.append
    )()
    assert ok is False
    assert any(line.startswith("CANCEL ALL FAILED: cannot publish the halt") for line in said)
