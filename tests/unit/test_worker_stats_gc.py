"""The worker stats record carries the garbage collector's pauses (they set the pipeline's latency tail)."""

from __future__ import annotations

import gc

from meltica.live.worker_stats import WorkerStats


def test_full_collections_are_counted_and_timed_while_installed() -> None:
    stats = WorkerStats("app", "host:1")
    assert stats.record()["gc"]["gen2"] == {"count": 0, "total_ms": 0.0, "max_ms": 0.0}
    stats.gc.install()
    stats.gc.install()  # once per worker however often it is asked
    try:
        keep = [[i] for i in range(50_000)]  # something to scan
        gc.collect()
        gc.collect(1)
    finally:
        stats.gc.uninstall()
    record = stats.record()["gc"]
    assert record["gen2"]["count"] >= 1  # ours, and any the interpreter started meanwhile
    assert record["gen1"]["count"] >= 1
    assert 0 < record["gen2"]["max_ms"] <= record["gen2"]["total_ms"]
    gc.collect()
    assert stats.record()["gc"]["gen2"] == record["gen2"]  # uninstalled: no longer counted
    assert len(keep) == 50_000
