"""The generic Faust worker (``streams/worker.py``) on the real broker, with the toy ``RunningSum``
processor (``live_worker_toy.py``: a running sum per key, trade ids kept in its state for dedupe, one
``risk.decisions`` output per new trade carrying the sum after it).

* in-process: malformed messages are dead-lettered with reasons while the agent keeps going; trace
  context flows from an input's ``traceparent`` to its output; ``meltica status --json`` shows lag 0
  and rates;
* subprocesses (``python -m streams.worker``): SIGKILL mid-stream then restart — nothing lost, no double
  effect, state restored from the changelog table; two workers split the partitions and, when one is
  SIGKILLed, the other takes its partitions over without loss; SIGTERM is a graceful stop (exit 0,
  ``processor.stop()`` ran, offsets committed).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meltica.domain import Trade
from meltica.infra.kafka import KafkaEndpoint
from meltica.messaging import Catalogue, Codec, DeadLetter, market_key
from meltica.messaging.admin import create_topics
from streams.worker import DUMP_DONE
from tests.kit import LoggedProcess, child_environment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TS = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01".encode()


# --- helpers -----------------------------------------------------------------------------------------


def _keys_per_partition(topic_partitions: int, per_partition: int) -> list[str]:
    """Market keys chosen so every partition of the input topic gets ``per_partition`` of them."""
    from aiokafka.partitioner import DefaultPartitioner

    partitioner = DefaultPartitioner()
    parts = list(range(topic_partitions))
    chosen: dict[int, list[str]] = defaultdict(list)
    i = 0
    while any(len(chosen[p]) < per_partition for p in parts):
        key = market_key("binance", f"C{i}/USDT")
        partition = int(partitioner(key.encode(), parts, parts))
        if len(chosen[partition]) < per_partition:
            chosen[partition].append(key)
        i += 1
    return [key for p in parts for key in chosen[p]]


def _trade(key: str, i: int) -> Trade:
    _exchange, symbol = key.split(":", 1)
    return Trade(
        exchange="binance",
        symbol=symbol,
        trade_id=f"t{i}",
        price=Decimal("100"),
        quantity=Decimal(i % 7 + 1) / 1000,
        ts=TS,
    )


def _produce(bootstrap: str, catalogue: Catalogue, items: list[tuple[str, bytes, list[tuple[str, bytes]]]]) -> None:
    """Send (key, value, headers) to md.trades in order, all acknowledged."""
    from aiokafka import AIOKafkaProducer

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            futures = [
                await producer.send(catalogue.topic_name("md.trades"), key=key.encode(), value=value, headers=headers)
                for key, value, headers in items
            ]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(send())


def _produce_trades(bootstrap: str, catalogue: Catalogue, trades: list[tuple[str, Trade]]) -> None:
    codec = Codec(catalogue)
    _produce(bootstrap, catalogue, [(key, codec.encode("md.trades", trade), []) for key, trade in trades])


class TopicReader:
    """Reads a whole topic, from the beginning to its current end, on every :meth:`poll`.

    A fresh aiokafka consumer (no group) per read: a long-lived kafka-python consumer in the test
    process was seen to stop fetching under load, which looked like a stuck worker."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.records: list[Any] = []

    def poll(self) -> list[Any]:
        self.records = asyncio.run(_read_topic(self.bootstrap, self.topic))
        return self.records

    def close(self) -> None:
        pass


async def _read_topic(bootstrap: str, topic: str) -> list[Any]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        records: list[Any] = []
        async with asyncio.timeout(30):
            while any(position < end[tp] for tp, position in [(tp, await consumer.position(tp)) for tp in tps]):
                for batch in (await consumer.getmany(*tps, timeout_ms=500)).values():
                    records.extend(batch)
        return records
    finally:
        await consumer.stop()


def _decisions(reader: TopicReader, codec: Codec) -> list[dict[str, Any]]:
    out = []
    for record in reader.poll():
        decision = codec.decode("risk.decisions", record.value)
        out.append({"id": decision.intent_id, **decision.details, "headers": dict(record.headers or [])})
    return out


def _wait(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _changelog_state(bootstrap: str, app_id: str, table: str = "toy-sum-state") -> dict[str, dict[str, Any]]:
    """The table's latest state per key, read from its changelog topic (what a restart recovers)."""
    state: dict[str, dict[str, Any]] = {}
    for record in asyncio.run(_read_topic(bootstrap, f"{app_id}-{table}-changelog")):
        key = record.key.decode()
        if record.value is None:
            state.pop(key, None)
        else:
            state[key] = json.loads(record.value)
    return state


def _expected(trades: list[tuple[str, Trade]]) -> tuple[dict[str, Decimal], dict[str, set[str]]]:
    sums: dict[str, Decimal] = defaultdict(Decimal)
    ids: dict[str, set[str]] = defaultdict(set)
    for key, trade in trades:
        sums[key] += trade.quantity
        ids[key].add(trade.trade_id)
    return dict(sums), dict(ids)


def _assert_exactly_once_effects(decisions: list[dict[str, Any]], trades: list[tuple[str, Trade]]) -> int:
    """Every trade has an output; redelivered ones repeat the same output (no double effect). → duplicates."""
    sums, ids = _expected(trades)
    by_id: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
    for d in decisions:
        by_id[d["id"]].append((d["key"], d["sum"], d["count"]))
    assert set(by_id) == {trade.trade_id for _key, trade in trades}, "an input was lost"
    for trade_id, outputs in by_id.items():
        assert len(set(outputs)) == 1, f"{trade_id} had two different effects: {outputs}"
    per_key: dict[str, list[int]] = defaultdict(list)
    final: dict[str, Decimal] = {}
    for key, total, count in (outputs[0] for outputs in by_id.values()):
        per_key[key].append(count)
        if count == len(ids[key]):
            final[key] = Decimal(total)
    for key in ids:
        # each trade of a key was counted once: the counts after each are exactly 1..n
        assert sorted(per_key[key]) == list(range(1, len(ids[key]) + 1)), key
        assert final[key] == sums[key], key
    return len(decisions) - len(by_id)


def _assert_table(bootstrap: str, app_id: str, trades: list[tuple[str, Trade]]) -> None:
    sums, ids = _expected(trades)

    def complete() -> bool:
        state = _changelog_state(bootstrap, app_id)
        return all(key in state and len(state[key]["seen"]) == len(ids[key]) for key in ids)

    _wait(complete, 30, "the table's changelog to hold the final state")
    state = _changelog_state(bootstrap, app_id)
    assert {key: Decimal(value["sum"]) for key, value in state.items()} == sums
    assert {key: set(value["seen"]) for key, value in state.items()} == ids


class Worker(LoggedProcess):
    """``python -m streams.worker`` as a subprocess (its output in a log file)."""

    def __init__(self, config: Path, app_id: str, log: Path) -> None:
        args = [sys.executable, "-m", "streams.worker", "--config", str(config), "--app-id", app_id]
        super().__init__(args, log, child_environment(pythonpath=[HERE]))


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        if worker.process.poll() is None:  # a test failed with this worker alive: log its tasks' stacks
            worker.dump_stacks(DUMP_DONE)
            print(f"--- worker {worker.pid} log tail ---\n{worker.output()[-20000:]}")
        worker.close()


def _config(tmp_path: Path, bootstrap: str, prefix: str, **params: Any) -> Path:
    path = tmp_path / "worker.yaml"
    path.write_text(
        json.dumps(
            {
                "bootstrap": bootstrap,
                "topic_prefix": prefix,
                "factory": "live_worker_toy:factory",
                "params": params,
                "stats_interval": 1.0,
            }
        )
    )
    return path


def _config_with(path: Path, **top: Any) -> Path:
    """``path``'s worker config with top-level keys added (e.g. ``stop_deadline``)."""
    config = json.loads(path.read_text())
    config.update(top)
    path.write_text(json.dumps(config))
    return path


def _md_trades_assignment(records: list[dict[str, Any]], topic: str) -> dict[str, list[int]]:
    return {
        r["worker_id"]: r["assigned"].get(topic, [])
        for r in records
        if r.get("state") == "running" and r["assigned"].get(topic)
    }


# --- tests -------------------------------------------------------------------------------------------


def test_dead_letters_trace_context_and_status(
    kafka_endpoint: KafkaEndpoint, unique_name: Callable[[str], str]
) -> None:
    from live_worker_toy import RunningSum

    from meltica.cli.status_cmd import collect_status
    from meltica.live import tracing
    from streams.worker import build_worker_app, runtime_of

    tracing.configure_tracing("memory")
    bootstrap = kafka_endpoint.bootstrap_servers
    prefix = unique_name("lw") + "."
    catalogue = Catalogue(prefix=prefix)
    codec = Codec(catalogue)
    create_topics(bootstrap, catalogue)
    app_id = unique_name("lw-inproc")
    key = market_key("binance", "BTC/USDT")
    good = [codec.encode("md.trades", _trade(key, i)) for i in range(3)]
    envelope = json.loads(good[0])
    del envelope["data"]["quantity"]
    bad = [b"{not json", codec.encode("risk.decisions", _decision()), json.dumps(envelope).encode()]
    traced = [("traceparent", TRACEPARENT)]
    first = [
        (key, good[0], traced),
        (key, bad[0], traced),
        (key, good[1], []),
        (key, bad[1], []),
        (key, bad[2], []),
        (key, good[2], traced),
    ]
    _produce(bootstrap, catalogue, first)
    # then a steady stream so a stats record sees a non-zero rate
    later = [(key, _trade(key, i)) for i in range(3, 103)]

    async def scenario() -> tuple[RunningSum, dict[str, Any], list[dict[str, Any]], float]:
        processor = RunningSum(delay=0.01)
        app = build_worker_app(app_id, bootstrap, [processor], catalogue, stats_interval=1.0)
        runtime = runtime_of(app)
        stats = runtime.stats.processors["toy-sum"]
        await app.start()
        try:
            async with asyncio.timeout(60):
                while len(processor.seen.get(key, ())) < 3 or sum(stats.dead_letters.values()) < 3:
                    await asyncio.sleep(0.05)
            await asyncio.to_thread(_produce_trades, bootstrap, catalogue, later)
            rates: list[float] = []
            lag_zero = None
            t0 = time.monotonic()
            async with asyncio.timeout(60):
                while True:
                    report = await asyncio.to_thread(collect_status, bootstrap, prefix, [app_id])
                    (group,) = report["groups"]
                    rates += [w["processors"]["toy-sum"]["rate_in"] for w in group["workers"] if w["processors"]]
                    if len(processor.seen[key]) == 103 and group["lag"] == 0 and group["topics"]:
                        lag_zero = report
                        break
                    await asyncio.sleep(0.3)
            drained_in = time.monotonic() - t0
            # the command itself, as an operator runs it, while the worker runs
            cli = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "meltica",
                "status",
                "--json",
                "--prefix",
                prefix,
                "--group",
                app_id,
                "--bootstrap",
                bootstrap,
                stdout=asyncio.subprocess.PIPE,
                cwd=REPO,
            )
            out, _ = await cli.communicate()
            assert cli.returncode == 0
            cli_report = json.loads(out)
        finally:
            await runtime.graceful_stop()
        assert lag_zero is not None
        return processor, cli_report, [{"rate": r} for r in rates], drained_in

    processor, cli_report, rates, drained_in = asyncio.run(scenario())
    print(f"100 trades drained and committed (lag 0 seen by status) in {drained_in:.1f}s")

    # the agent kept going: every good trade counted once
    assert processor.sums[key] == sum((_trade(key, i).quantity for i in range(103)), Decimal(0))

    # dead letters with reasons
    dlq = TopicReader(bootstrap, catalogue.topic_name("dlq"))
    try:
        _wait(lambda: len(dlq.poll()) >= 3, 20, "3 dead letters")
        letters: list[DeadLetter] = sorted((codec.decode("dlq", r.value) for r in dlq.records), key=lambda d: d.offset)
    finally:
        dlq.close()
    assert [(d.offset, d.error_type) for d in letters] == [
        (1, "invalid_json"),
        (3, "wrong_schema"),
        (4, "validation_error"),
    ]
    assert "data.quantity: Field required" in letters[2].reason
    assert [d.original_bytes() for d in letters] == bad

    # trace context: traced inputs → outputs in the same trace, child of the handle span
    outputs = TopicReader(bootstrap, catalogue.topic_name("risk.decisions"))
    try:
        _wait(lambda: len(outputs.poll()) >= 103, 20, "103 outputs")
        decisions = _decisions(outputs, codec)
    finally:
        outputs.close()
    by_id = {d["id"]: d for d in decisions}
    for trade_id in ("t0", "t2"):
        assert tracing.trace_id_of(by_id[trade_id]["headers"]) == TRACE_ID
    untraced = tracing.trace_id_of(by_id["t1"]["headers"])
    assert untraced is not None and untraced != TRACE_ID  # a new trace starts at an untraced input
    spans = [s for s in tracing.finished_spans() if s.name == "toy-sum.handle md.trades"]
    traced_spans = [s for s in spans if format(s.context.trace_id, "032x") == TRACE_ID]
    assert len(traced_spans) == 2
    assert {format(s.parent.span_id, "016x") for s in traced_spans} == {PARENT_SPAN}
    out_span_ids = {by_id[t]["headers"]["traceparent"].decode().split("-")[2] for t in ("t0", "t2")}
    assert out_span_ids == {format(s.context.span_id, "016x") for s in traced_spans}

    # status: lag 0 on every input partition, the agent's counts and a measured rate
    (group,) = cli_report["groups"]
    assert group["group"] == app_id and group["lag"] == 0
    trades_parts = group["topics"][catalogue.topic_name("md.trades")]
    assert trades_parts and all(p["lag"] == 0 and p["committed"] == p["end"] for p in trades_parts)
    agent = group["processors"]["toy-sum"]
    assert agent["in"]["md.trades"] >= 106 and agent["dead_letters"] == {"md.trades": 3}
    assert agent["out"]["risk.decisions"] == 103
    assert any(r["rate"] > 0 for r in rates), rates
    assert {w["state"] for w in group["workers"]} == {"running"}
    assert {row["service"] for row in cli_report["infra"]} >= {"kafka", "postgres"}


@pytest.mark.parametrize("batch_inputs", [True, False], ids=["batch-lanes", "per-event"])
def test_sigkill_mid_stream_then_restart_loses_nothing_and_doubles_nothing(
    kafka_endpoint: KafkaEndpoint,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    workers: list[Worker],
    batch_inputs: bool,
) -> None:
    bootstrap = kafka_endpoint.bootstrap_servers
    prefix = unique_name("lw") + "."
    catalogue = Catalogue(prefix=prefix)
    codec = Codec(catalogue)
    create_topics(bootstrap, catalogue)
    app_id = unique_name("lw-restart")
    keys = _keys_per_partition(catalogue.spec("md.trades").partitions, 1)
    trades = [(keys[i % len(keys)], _trade(keys[i % len(keys)], i)) for i in range(1200)]
    _produce_trades(bootstrap, catalogue, trades)
    marker = tmp_path / "stopped.json"
    config = _config_with(
        _config(tmp_path, bootstrap, prefix, delay=0.004, stop_marker=str(marker)), batch_inputs=batch_inputs
    )
    outputs = TopicReader(bootstrap, catalogue.topic_name("risk.decisions"))
    try:
        first = Worker(config, app_id, tmp_path / "worker1.log")
        workers.append(first)
        _wait(lambda: len(outputs.poll()) >= 300, 90, "300 outputs from the first worker")
        first.kill()
        at_kill = len(outputs.poll())
        assert at_kill < len(trades), "the worker finished before it was killed"
        assert not marker.exists()  # SIGKILL: no graceful stop

        second = Worker(config, app_id, tmp_path / "worker2.log")
        workers.append(second)
        t0 = time.monotonic()
        _wait(
            lambda: {d["id"] for d in _decisions(outputs, codec)} >= {t.trade_id for _k, t in trades},
            90,
            "every trade handled after the restart",
        )
        print(f"killed after {at_kill} outputs; restarted worker finished the rest in {time.monotonic() - t0:.1f}s")
        assert second.terminate() == 0, second.output()[-3000:]
        # it stopped gracefully (its producer flushed): every output is on the topic, read to its end now
        decisions = _decisions(outputs, codec)
    finally:
        outputs.close()

    duplicates = _assert_exactly_once_effects(decisions, trades)
    print(f"{len(decisions)} outputs for {len(trades)} trades: {duplicates} duplicate(s) at the crash point")
    print(f"skipped ranges read again by the consumer guard: {_rereads(first, second)}")
    _assert_table(bootstrap, app_id, trades)
    log = second.output()
    assert f"restored {len(keys)} key(s) from table toy-sum-state" in log, log[-3000:]
    assert json.loads(marker.read_text())["pid"] == second.pid  # processor.stop() ran on SIGTERM

    # graceful stop committed every offset: lag 0
    from meltica.cli.status_cmd import collect_status

    (group,) = collect_status(bootstrap, prefix, [app_id])["groups"]
    assert group["lag"] == 0 and group["topics"][catalogue.topic_name("md.trades")]
    stopped = [w for w in group["workers"] if w["state"] == "stopped"]
    assert stopped and sum(stopped[0]["processors"]["toy-sum"]["out"].values()) > 0


def test_sigterm_with_messages_queued_stops_at_once_and_loses_nothing(
    kafka_endpoint: KafkaEndpoint, unique_name: Callable[[str], str], tmp_path: Path, workers: list[Worker]
) -> None:
    # A SIGTERM while the agent's stream still holds fetched messages: the agent takes one more after the
    # stop began and parks it unacknowledged (it must not be committed). Faust's own stop used to wait for
    # that message's acknowledgement forever, so the worker hung until its stop watchdog exited 1 (the
    # kill-switch end-to-end test's occasional failure).
    bootstrap = kafka_endpoint.bootstrap_servers
    prefix = unique_name("lw") + "."
    catalogue = Catalogue(prefix=prefix)
    codec = Codec(catalogue)
    create_topics(bootstrap, catalogue)
    app_id = unique_name("lw-term")
    keys = _keys_per_partition(catalogue.spec("md.trades").partitions, 1)
    trades = [(keys[i % len(keys)], _trade(keys[i % len(keys)], i)) for i in range(1000)]
    _produce_trades(bootstrap, catalogue, trades)
    marker = tmp_path / "stopped.json"
    deadline = 20.0
    config = _config_with(
        _config(tmp_path, bootstrap, prefix, delay=0.004, stop_marker=str(marker)), stop_deadline=deadline
    )
    outputs = TopicReader(bootstrap, catalogue.topic_name("risk.decisions"))
    first = Worker(config, app_id, tmp_path / "worker1.log")
    workers.append(first)
    _wait(lambda: len(outputs.poll()) >= 100, 90, "100 outputs")
    # the watchdog would end a stuck stop with exit 1 after `deadline` seconds: exit 0 means it never hung
    assert first.terminate(timeout=deadline + 30) == 0, first.output()[-3000:]
    assert "exiting now (watchdog)" not in first.output()
    assert json.loads(marker.read_text())["pid"] == first.pid  # processor.stop() ran
    at_stop = {d["id"] for d in _decisions(outputs, codec)}
    assert len(at_stop) < len(trades), "the worker finished before it was stopped"

    # Nothing taken after the stop was committed: a new worker handles every remaining trade.
    second = Worker(config, app_id, tmp_path / "worker2.log")
    workers.append(second)
    everything = {t.trade_id for _k, t in trades}
    _wait(lambda: {d["id"] for d in _decisions(outputs, codec)} >= everything, 90, "every trade after the restart")
    assert second.terminate(timeout=deadline + 30) == 0, second.output()[-3000:]
    _assert_exactly_once_effects(_decisions(outputs, codec), trades)


def test_a_worker_that_stops_handling_while_input_waits_exits_to_be_restarted(
    kafka_endpoint: KafkaEndpoint, unique_name: Callable[[str], str], tmp_path: Path, workers: list[Worker]
) -> None:
    # A worker that keeps its partitions but handles nothing more (here: a handle that never returns, as
    # an output whose acknowledgement never comes) would stop the pipeline silently: the stall watchdog
    # ends it with exit 3 so a supervisor restarts it; the restarted worker loses nothing.
    from streams.worker import STALLED

    bootstrap = kafka_endpoint.bootstrap_servers
    prefix = unique_name("lw") + "."
    catalogue = Catalogue(prefix=prefix)
    codec = Codec(catalogue)
    create_topics(bootstrap, catalogue)
    app_id = unique_name("lw-stall")
    keys = _keys_per_partition(catalogue.spec("md.trades").partitions, 1)
    trades = [(keys[i % len(keys)], _trade(keys[i % len(keys)], i)) for i in range(300)]
    _produce_trades(bootstrap, catalogue, trades)
    stalling = _config_with(_config(tmp_path, bootstrap, prefix, stall_after=50), stall_deadline=4)
    outputs = TopicReader(bootstrap, catalogue.topic_name("risk.decisions"))
    first = Worker(stalling, app_id, tmp_path / "worker1.log")
    workers.append(first)
    code = first.process.wait(timeout=120)
    assert code == STALLED, first.output()[-3000:]
    assert "stalled: no message handed over" in first.output()
    assert "stall_after" not in first.output()  # (the config is not echoed)
    handled_before = {d["id"] for d in _decisions(outputs, codec)}
    assert 0 < len(handled_before) <= 50

    healthy = tmp_path / "healthy"
    healthy.mkdir()
    second = Worker(_config(healthy, bootstrap, prefix), app_id, tmp_path / "worker2.log")
    workers.append(second)
    everything = {t.trade_id for _k, t in trades}
    _wait(lambda: {d["id"] for d in _decisions(outputs, codec)} >= everything, 90, "every trade after the restart")
    assert second.terminate() == 0, second.output()[-3000:]
    _assert_exactly_once_effects(_decisions(outputs, codec), trades)


def test_a_state_larger_than_kafkas_default_record_is_stored_and_restored(
    kafka_endpoint: KafkaEndpoint, unique_name: Callable[[str], str], tmp_path: Path, workers: list[Worker]
) -> None:
    # One key's state is one changelog record. Kafka takes 1 MB records by default: a strategy host holding
    # thousands of unanswered orders after a backlog wrote 1.0 MB, Faust's producer buffer crashed on it and
    # the worker stalled. A 1.5 MB state is stored, and the restarted worker goes on from it.
    bootstrap = kafka_endpoint.bootstrap_servers
    prefix = unique_name("lw") + "."
    catalogue = Catalogue(prefix=prefix)
    codec = Codec(catalogue)
    create_topics(bootstrap, catalogue)
    app_id = unique_name("lw-big-state")
    (key,) = _keys_per_partition(catalogue.spec("md.trades").partitions, 1)[:1]
    pad = 1_500_000
    config = _config(tmp_path, bootstrap, prefix, pad=pad)
    outputs = TopicReader(bootstrap, catalogue.topic_name("risk.decisions"))
    _produce_trades(bootstrap, catalogue, [(key, _trade(key, i)) for i in range(10)])
    first = Worker(config, app_id, tmp_path / "worker1.log")
    workers.append(first)
    _wait(lambda: len(_changelog_state(bootstrap, app_id).get(key, {}).get("seen", [])) == 10, 90, "the stored state")
    assert len(_changelog_state(bootstrap, app_id)[key]["pad"]) == pad
    assert first.terminate() == 0, first.output()[-3000:]

    second = Worker(config, app_id, tmp_path / "worker2.log")
    workers.append(second)
    _produce_trades(bootstrap, catalogue, [(key, _trade(key, i)) for i in range(10, 15)])
    _wait(lambda: len(_decisions(outputs, codec)) >= 15, 90, "the trades after the restart")
    # each output counts the trades seen so far: the restarted worker went on from the restored state
    assert [d["count"] for d in _decisions(outputs, codec)] == list(range(1, 16))
    assert "restored 1 key(s) from table toy-sum-state" in second.output(), second.output()[-3000:]
    assert second.terminate() == 0, second.output()[-3000:]


def test_a_state_too_large_for_one_record_stops_the_worker_and_says_why(
    kafka_endpoint: KafkaEndpoint, unique_name: Callable[[str], str], tmp_path: Path, workers: list[Worker]
) -> None:
    # A state that cannot be stored would be lost at the next restart: the worker stops (exit 1) and names the
    # processor, the key and the size instead of running on without it.
    from streams.worker import STATE_RECORD_MAX_BYTES

    bootstrap = kafka_endpoint.bootstrap_servers
    prefix = unique_name("lw") + "."
    catalogue = Catalogue(prefix=prefix)
    create_topics(bootstrap, catalogue)
    app_id = unique_name("lw-huge-state")
    (key,) = _keys_per_partition(catalogue.spec("md.trades").partitions, 1)[:1]
    _produce_trades(bootstrap, catalogue, [(key, _trade(key, 0))])
    worker = Worker(_config(tmp_path, bootstrap, prefix, pad=STATE_RECORD_MAX_BYTES), app_id, tmp_path / "w.log")
    workers.append(worker)
    code = worker.process.wait(timeout=120)
    log = worker.output()
    assert code == 1, log[-3000:]
    assert f"the state of processor toy-sum for key {key!r} is" in log, log[-3000:]
    assert f"more than the {STATE_RECORD_MAX_BYTES:,} one changelog record holds" in log
    assert _changelog_state(bootstrap, app_id) == {}  # nothing cut or partial was stored


def test_two_workers_split_partitions_and_fail_over_without_loss(
    kafka_endpoint: KafkaEndpoint, unique_name: Callable[[str], str], tmp_path: Path, workers: list[Worker]
) -> None:
    from meltica.live.worker_stats import read_stats

    bootstrap = kafka_endpoint.bootstrap_servers
    prefix = unique_name("lw") + "."
    catalogue = Catalogue(prefix=prefix)
    codec = Codec(catalogue)
    create_topics(bootstrap, catalogue)
    topic = catalogue.topic_name("md.trades")
    partitions = catalogue.spec("md.trades").partitions
    app_id = unique_name("lw-pair")
    keys = _keys_per_partition(partitions, 2)
    config = _config(tmp_path, bootstrap, prefix, delay=0.003)
    first = Worker(config, app_id, tmp_path / "a.log")
    second = Worker(config, app_id, tmp_path / "b.log")
    workers += [first, second]

    def split() -> dict[str, list[int]]:
        return _md_trades_assignment(read_stats(bootstrap, prefix), topic)

    def both_assigned() -> bool:
        running = {w: p for w, p in split().items() if w.endswith((f":{first.pid}", f":{second.pid}"))}
        return len(running) == 2 and sorted(p for ps in running.values() for p in ps) == list(range(partitions))

    _wait(both_assigned, 60, "both workers to hold a share of the partitions")
    shares = {w: p for w, p in split().items() if w.endswith((f":{first.pid}", f":{second.pid}"))}
    print(f"partitions split: {shares}")
    assert all(shares.values()) and not set(next(iter(shares.values()))) & set(list(shares.values())[1])

    batch1 = [(keys[i % len(keys)], _trade(keys[i % len(keys)], i)) for i in range(600)]
    batch2 = [(keys[i % len(keys)], _trade(keys[i % len(keys)], i)) for i in range(600, 1400)]
    outputs = TopicReader(bootstrap, catalogue.topic_name("risk.decisions"))
    try:
        _produce_trades(bootstrap, catalogue, batch1)
        _wait(lambda: len(outputs.poll()) >= len(batch1), 60, "batch 1 handled by the pair")

        def both_worked() -> bool:
            counts = {
                r["worker_id"]: r["processors"]["toy-sum"]["in"].get("md.trades", 0)
                for r in read_stats(bootstrap, prefix)
                if r["worker_id"].endswith((f":{first.pid}", f":{second.pid}"))
            }
            return len(counts) == 2 and all(counts.values())

        _wait(both_worked, 20, "stats showing both workers handled messages")

        _produce_trades(bootstrap, catalogue, batch2)
        _wait(lambda: len(outputs.poll()) >= len(batch1) + 100, 60, "batch 2 under way")
        first.kill()
        killed_at = time.monotonic()
        everything = {t.trade_id for _k, t in batch1 + batch2}
        _wait(lambda: {d["id"] for d in _decisions(outputs, codec)} >= everything, 90, "every trade after failover")
        print(f"failover: the survivor finished every input {time.monotonic() - killed_at:.1f}s after the SIGKILL")
        _wait(lambda: sorted(split().get(f"{_host()}:{second.pid}", [])) == list(range(partitions)), 30, "takeover")
        assert second.terminate() == 0, second.output()[-3000:]
        # it stopped gracefully (its producer flushed): every output is on the topic, read to its end now
        decisions = _decisions(outputs, codec)
    finally:
        outputs.close()

    duplicates = _assert_exactly_once_effects(decisions, batch1 + batch2)
    print(f"{len(decisions)} outputs for {len(batch1) + len(batch2)} trades: {duplicates} duplicate(s)")
    print(f"skipped ranges read again by the consumer guard: {_rereads(first, second)}")
    _assert_table(bootstrap, app_id, batch1 + batch2)


def _rereads(*workers: Worker) -> int:
    """How often a worker's consumer guard caught Faust skipping fetched input (streams/worker.py)."""
    return sum(worker.output().count("were never handed over: reading them again") for worker in workers)


def _host() -> str:
    import socket

    return socket.gethostname()


def _decision() -> Any:
    from meltica.messaging import RiskDecisionMessage

    return RiskDecisionMessage(intent_id="x", approved=True, ts=TS)


# --- two stages in one worker: the batch lanes' in-process hand-over (streams/lanes.py) ---------------


def _relayed_trades(keys: list[str], count: int) -> list[tuple[str, Trade]]:
    """Trades whose identity survives the relay to ``md.ticker`` (``live_worker_toy.relayed_trade_id``)."""
    from live_worker_toy import RELAY_EPOCH

    out = []
    for i in range(count):
        key = keys[i % len(keys)]
        trade = _trade(key, i).model_copy(update={"ts": RELAY_EPOCH + timedelta(microseconds=i)})
        out.append((key, trade))
    return out


def _assert_in_trade_order(decisions: list[dict[str, Any]]) -> None:
    """Per key, the running count grows with the trade index: stage two saw each key's trades in order."""
    first: dict[str, tuple[str, int]] = {}
    for d in decisions:
        first.setdefault(d["id"], (d["key"], d["count"]))
    per_key: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for trade_id, (key, count) in first.items():
        per_key[key].append((int(trade_id[1:]), count))
    for key, pairs in per_key.items():
        counts = [count for _index, count in sorted(pairs)]
        assert counts == list(range(1, len(counts) + 1)), f"{key}: out of order {counts[:20]}"


def _lanes_stats(bootstrap: str, prefix: str, worker: Worker) -> dict[str, int]:
    from meltica.live.worker_stats import read_stats

    # the worker has exited; its last record is on the broker, but a read right after may not see it yet
    stopped: list[dict[str, Any]] = []

    def read() -> bool:
        stopped[:] = [r for r in read_stats(bootstrap, prefix) if r.get("state") == "stopped"]
        return bool(stopped)

    try:
        _wait(read, 30, "the worker's final (stopped) stats record")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the worker said:\n{worker.output()[-3000:]}") from None
    (record,) = stopped
    lanes: dict[str, int] = record["lanes"]
    return lanes


@pytest.mark.parametrize("hand_over", [True, False], ids=["hand-over", "fetched"])
def test_two_stages_in_one_worker_hand_records_over_in_order(
    kafka_endpoint: KafkaEndpoint,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    workers: list[Worker],
    hand_over: bool,
) -> None:
    """Stage one's outputs reach stage two of the same worker in-process (once the broker acknowledged
    them), in partition order, each once; with ``hand_over: false`` every one is fetched back."""
    bootstrap = kafka_endpoint.bootstrap_servers
    prefix = unique_name("lh") + "."
    catalogue = Catalogue(prefix=prefix)
    codec = Codec(catalogue)
    create_topics(bootstrap, catalogue)
    keys = _keys_per_partition(catalogue.spec("md.trades").partitions, 2)
    trades = _relayed_trades(keys, 600)
    primers, rest = trades[: len(keys)], trades[len(keys) :]
    config = _config_with(
        _config(tmp_path, bootstrap, prefix), factory="live_worker_toy:two_stage_factory", hand_over=hand_over
    )
    outputs = TopicReader(bootstrap, catalogue.topic_name("risk.decisions"))
    worker = Worker(config, unique_name("lh-app"), tmp_path / "worker.log")
    workers.append(worker)
    # one trade per key first: stage two fetches a first ticker on every partition, so it is known to have
    # handled everything before what stage one sends next (a lane that has fetched nothing from a partition
    # is never handed a record of it)
    _produce_trades(bootstrap, catalogue, primers)
    _wait(lambda: len(outputs.poll()) >= len(primers), 90, "an output for every primer")
    _produce_trades(bootstrap, catalogue, rest)
    _wait(lambda: len(outputs.poll()) >= len(trades), 90, "an output for every trade")
    assert worker.terminate() == 0, worker.output()[-3000:]
    decisions = _decisions(outputs, codec)

    assert _assert_exactly_once_effects(decisions, trades) == 0
    _assert_in_trade_order(decisions)
    lanes = _lanes_stats(bootstrap, prefix, worker)
    assert lanes["records"] >= 2 * len(trades)  # both stages handled every record
    if hand_over:
        assert lanes["handed_over"] == len(rest), lanes  # each after the primers, not fetched
    else:
        assert lanes["handed_over"] == 0, lanes


def test_records_of_another_producer_between_handed_over_ones_are_each_handled_once(
    kafka_endpoint: KafkaEndpoint,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    workers: list[Worker],
) -> None:
    """Stage one's outputs are handed to stage two before the broker placed them; another producer writes to the
    same partitions meanwhile, so the broker puts its records between ours: every record (ours, handed over, and
    the other producer's, fetched) has exactly one effect, each key's in order."""
    from aiokafka import AIOKafkaProducer
    from live_worker_toy import RELAY_EPOCH, top_of_book

    bootstrap = kafka_endpoint.bootstrap_servers
    prefix = unique_name("lo") + "."
    catalogue = Catalogue(prefix=prefix)
    codec = Codec(catalogue)
    create_topics(bootstrap, catalogue)
    partitions = catalogue.spec("md.trades").partitions
    assert catalogue.spec("md.ticker").partitions == partitions
    keys = _keys_per_partition(partitions, 3)
    ours, theirs = [k for i, k in enumerate(keys) if i % 3 != 2], [k for i, k in enumerate(keys) if i % 3 == 2]
    trades = _relayed_trades(ours, 1200)
    primers, rest = trades[: len(ours)], trades[len(ours) :]
    # the other producer's tickers, as stage two reads them (trade ids past the relayed ones)
    foreign = []
    for i in range(600):
        key = theirs[i % len(theirs)]
        trade = _trade(key, i).model_copy(
            update={"trade_id": f"t{10_000_000 + i}", "ts": RELAY_EPOCH + timedelta(microseconds=10_000_000 + i)}
        )
        foreign.append((key, trade))
    config = _config_with(_config(tmp_path, bootstrap, prefix), factory="live_worker_toy:two_stage_factory")
    outputs = TopicReader(bootstrap, catalogue.topic_name("risk.decisions"))
    worker = Worker(config, unique_name("lo-app"), tmp_path / "worker.log")
    workers.append(worker)
    _produce_trades(bootstrap, catalogue, primers)  # stage two fetches from every partition first
    _wait(lambda: len(outputs.poll()) >= len(primers), 90, "an output for every primer")

    async def send_both() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
        await producer.start()
        try:
            for i in range(0, len(rest), 20):  # small lots, trades and tickers alternating, while the worker runs
                futures = []
                for key, trade in rest[i : i + 20]:
                    value = codec.encode("md.trades", trade)
                    futures.append(await producer.send(catalogue.topic_name("md.trades"), value, key=key.encode()))
                for key, trade in foreign[i // 2 : i // 2 + 10]:
                    value = codec.encode("md.ticker", top_of_book(trade))
                    futures.append(await producer.send(catalogue.topic_name("md.ticker"), value, key=key.encode()))
                await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(send_both())
    everything = trades + foreign
    _wait(lambda: len(outputs.poll()) >= len(everything), 90, "an output for every trade and ticker")
    assert worker.terminate() == 0, worker.output()[-3000:]
    decisions = _decisions(outputs, codec)

    assert _assert_exactly_once_effects(decisions, everything) == 0
    _assert_in_trade_order(decisions)
    lanes = _lanes_stats(bootstrap, prefix, worker)
    assert lanes["handed_over"] > 0, lanes
    print(f"handed over {lanes['handed_over']} of {len(rest)} relayed tickers; {len(foreign)} fetched from the other")


def test_sigkill_between_handed_over_stages_then_restart_loses_nothing(
    kafka_endpoint: KafkaEndpoint,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    workers: list[Worker],
) -> None:
    """A record handed over in-process is committed only when fetched: SIGKILL while the stages hand over,
    restart, and every trade has exactly one effect (stage two's dedupe state restored from its table)."""
    bootstrap = kafka_endpoint.bootstrap_servers
    prefix = unique_name("lk") + "."
    catalogue = Catalogue(prefix=prefix)
    codec = Codec(catalogue)
    create_topics(bootstrap, catalogue)
    app_id = unique_name("lk-app")
    keys = _keys_per_partition(catalogue.spec("md.trades").partitions, 1)
    trades = _relayed_trades(keys, 1200)
    _produce_trades(bootstrap, catalogue, trades)
    factory = "live_worker_toy:two_stage_factory"
    config = _config_with(_config(tmp_path, bootstrap, prefix, delay=0.004), factory=factory)
    outputs = TopicReader(bootstrap, catalogue.topic_name("risk.decisions"))
    first = Worker(config, app_id, tmp_path / "worker1.log")
    workers.append(first)
    _wait(lambda: len(outputs.poll()) >= 300, 90, "300 outputs from the first worker")
    first.kill()
    assert len(outputs.poll()) < len(trades), "the worker finished before it was killed"
    second = Worker(config, app_id, tmp_path / "worker2.log")
    workers.append(second)
    _wait(
        lambda: {d["id"] for d in _decisions(outputs, codec)} >= {t.trade_id for _k, t in trades},
        90,
        "every trade handled after the restart",
    )
    assert second.terminate() == 0, second.output()[-3000:]
    decisions = _decisions(outputs, codec)
    duplicates = _assert_exactly_once_effects(decisions, trades)
    _assert_in_trade_order(decisions)
    print(f"{len(decisions)} outputs for {len(trades)} trades: {duplicates} duplicate(s) at the crash point")
