"""`meltica status`: the live pipeline at a glance — consumer lag, per-agent rates, infrastructure.

Groups shown: every app id that published a worker stats record (``<prefix>meltica.worker-stats``, see
:mod:`meltica.live.worker_stats`) plus those given with ``--group``. For each group: its state and
members (``describe_groups``), and lag per topic/partition = end offset − committed offset
(``list_group_offsets`` vs ``list_partition_offsets``; a partition without a committed offset counts
from the start of the log). For each processor: messages in/out, dead letters, rates and handle
latency summed (rates) or maxed (latency) over the group's workers whose last record is fresh (younger
than three stats intervals); older records are listed as stale, stopped ones as stopped.
kafka-python only: ``meltica/`` does not import Faust.
"""

# lazy imports: a command loads backtest/live/messaging/kafka/numpy when it runs, so `meltica --help` starts fast

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import typer

from meltica import infra
from meltica.cli._common import console, reports_errors

_BOOTSTRAP_HELP = "host:port[,host:port] (default: MELTICA_KAFKA_BOOTSTRAP, else the local dev broker)"
_PREFIX_HELP = "topic name prefix (default: MELTICA_TOPIC_PREFIX, else none)"
STALE_INTERVALS = 3.0


def _worker_view(record: dict[str, Any]) -> dict[str, Any]:
    from meltica.live.worker_stats import record_age_seconds

    age = record_age_seconds(record)
    interval = float(record.get("interval_s") or 5.0)
    if record.get("state") == "stopped":
        liveness = "stopped"
    elif age is not None and age <= STALE_INTERVALS * max(interval, 1.0):
        liveness = "running"
    else:
        liveness = "stale"
    return {
        "worker_id": record.get("worker_id"),
        "state": liveness,
        "age_s": None if age is None else round(age, 1),
        "assigned": record.get("assigned", {}),
        "processors": record.get("processors", {}),
    }


def _processors_view(workers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Totals over all records of a group; rates and latency over the running workers only."""
    merged: dict[str, dict[str, Any]] = {}
    for worker in workers:
        running = worker["state"] == "running"
        for name, stats in worker["processors"].items():
            view = merged.setdefault(
                name,
                {
                    "in": Counter(),
                    "out": Counter(),
                    "dead_letters": Counter(),
                    "errors": 0,
                    "rate_in": 0.0,
                    "rate_out": 0.0,
                    "latency_ms_p50": None,
                    "latency_ms_p99": None,
                    "workers": 0,
                },
            )
            view["in"].update(stats.get("in", {}))
            view["out"].update(stats.get("out", {}))
            view["dead_letters"].update(stats.get("dead_letters", {}))
            view["errors"] += int(stats.get("errors", 0))
            if running:
                view["workers"] += 1
                view["rate_in"] += float(stats.get("rate_in", 0.0))
                view["rate_out"] += float(stats.get("rate_out", 0.0))
                latency = stats.get("latency_ms") or {}
                for q in ("p50", "p99"):
                    if latency.get(q) is not None:
                        field = f"latency_ms_{q}"
                        view[field] = max(view[field] or 0.0, float(latency[q]))
    for view in merged.values():
        for counter in ("in", "out", "dead_letters"):
            view[counter] = dict(view[counter])
        view["rate_in"] = round(view["rate_in"], 3)
        view["rate_out"] = round(view["rate_out"], 3)
    return merged


def collect_status(
    bootstrap: str, prefix: str, groups: list[str] | None = None, *, timeout_ms: int = 10_000
) -> dict[str, Any]:
    """Everything ``meltica status --json`` prints."""
    from kafka.admin import OffsetSpec

    from meltica.live.worker_stats import read_stats, stats_topic_name
    from meltica.messaging.admin import admin_client

    records = read_stats(bootstrap, prefix, timeout_ms=timeout_ms)
    by_group: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_group.setdefault(str(record.get("app_id")), []).append(_worker_view(record))
    group_ids = sorted(set(groups or []) | set(by_group))
    admin = admin_client(bootstrap, timeout_ms)
    try:
        cluster = admin.describe_cluster()
        # Faust members carry their own assignor metadata, which kafka-python warns it cannot decode.
        groups_log = logging.getLogger("kafka.admin._groups")
        level, groups_log.level = groups_log.level, logging.ERROR
        try:
            described = admin.describe_groups(group_ids) if group_ids else {}
        finally:
            groups_log.setLevel(level)
        committed = admin.list_group_offsets({g: None for g in group_ids}) if group_ids else {}
        tps = {tp for offsets in committed.values() for tp in offsets}
        ends = admin.list_partition_offsets({tp: OffsetSpec.LATEST for tp in tps}) if tps else {}
    finally:
        admin.close()
    result_groups = []
    for group in group_ids:
        info = described.get(group) or {}
        topics: dict[str, list[dict[str, Any]]] = {}
        total = 0
        for tp, meta in sorted(
            (committed.get(group) or {}).items(), key=lambda item: (item[0].topic, item[0].partition)
        ):
            end = ends[tp].offset if tp in ends else None
            position = meta.offset if meta.offset is not None and meta.offset >= 0 else 0
            lag = None if end is None else max(end - position, 0)
            total += lag or 0
            topics.setdefault(tp.topic, []).append(
                {"partition": tp.partition, "committed": meta.offset, "end": end, "lag": lag}
            )
        workers = by_group.get(group, [])
        result_groups.append(
            {
                "group": group,
                "state": info.get("group_state"),
                "members": len(info.get("members") or []),
                "lag": total,
                "topics": topics,
                "workers": workers,
                "processors": _processors_view(workers),
            }
        )
    return {
        "kafka": {
            "bootstrap": bootstrap,
            "brokers": len(cluster.get("brokers", [])),
            "cluster_id": cluster.get("cluster_id"),
        },
        "stats_topic": stats_topic_name(prefix),
        "groups": result_groups,
        "infra": _infra(),
    }


def _infra() -> list[dict[str, Any]]:
    try:
        return [{"service": row.service, "running": row.running, "kind": row.kind} for row in infra.status()]
    except Exception as exc:  # the status line must not hide the pipeline view
        return [{"service": "infra", "running": False, "kind": f"unknown ({exc})"}]


@reports_errors
def status(
    bootstrap: str | None = typer.Option(None, "--bootstrap", help=_BOOTSTRAP_HELP),
    prefix: str | None = typer.Option(None, "--prefix", help=_PREFIX_HELP),
    group: list[str] = typer.Option([], "--group", "-g", help="consumer group / app id to show (repeatable)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, help="seconds to wait for the broker"),
) -> None:
    """Consumer lag per group and partition, per-agent rates and dead letters, infrastructure."""
    from meltica.messaging.admin import default_bootstrap
    from meltica.messaging.catalogue import Catalogue

    resolved_prefix = Catalogue(prefix=prefix).prefix
    report = collect_status(
        bootstrap or default_bootstrap(), resolved_prefix, list(group), timeout_ms=int(timeout * 1000)
    )
    if as_json:
        console.print_json(json.dumps(report, default=str))
        return
    infra_line = ", ".join(f"{row['service']} {'up' if row['running'] else 'DOWN'}" for row in report["infra"])
    kafka = report["kafka"]
    console.print(f"infra: {infra_line}; kafka {kafka['bootstrap']} ({kafka['brokers']} broker(s))", highlight=False)
    if not report["groups"]:
        console.print(f"no worker has published to {report['stats_topic']}; give --group to see a group's lag")
    for entry in report["groups"]:
        console.print(
            f"\n[bold]{entry['group']}[/] state={entry['state']} members={entry['members']} lag={entry['lag']}",
            highlight=False,
        )
        for topic, parts in entry["topics"].items():
            lags = " ".join(f"{p['partition']}:{p['lag']}" for p in parts)
            console.print(f"  {topic}  lag by partition {lags}", highlight=False, soft_wrap=True)
        for worker in entry["workers"]:
            console.print(f"  worker {worker['worker_id']} {worker['state']} ({worker['age_s']}s ago)", highlight=False)
        for name, view in entry["processors"].items():
            console.print(
                f"  agent {name}: in {sum(view['in'].values())} ({view['rate_in']}/s) "
                f"out {sum(view['out'].values())} ({view['rate_out']}/s) "
                f"dead letters {sum(view['dead_letters'].values())} errors {view['errors']} "
                f"latency p50 {view['latency_ms_p50']} ms p99 {view['latency_ms_p99']} ms",
                highlight=False,
                soft_wrap=True,
            )
