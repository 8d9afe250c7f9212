"""Backtests and parameter sweeps as Prefect flow runs (a thin shell over ``meltica.backtest``).

* ``backtest(...)``: one run of the event-driven engine (``meltica.backtest.engine.run_backtest``) on a
  candle file or on the stored candles; the result is saved (``backtest_runs`` + metrics, equity,
  trades) and written to ``<output_dir>/<run_id>/`` (``metrics.json``, CSVs, ``report.html``, PNGs).
* ``sweep(...)``: the same task mapped over a parameter grid (``meltica.backtest.optimize.grid``: invalid
  points skipped), concurrently on the flow's thread-pool task runner (at most ``workers`` at once),
  every run stored under one ``sweep_id`` and ranked by ``objective`` (``optimize.rank_runs``).

Artifacts: a markdown table of metrics (sweep: every run, ranked, and the best parameters) and a markdown
artifact with the equity, drawdown and position charts embedded (``data:`` URIs: the UI shows them) and a link
to the full report under ``reports_url``: a backtest's report (a sweep's: only the best run's) is stored in the
database (``meltica.reporting.stored``) and served by ``meltica reports serve``; the link is written only when
the report is stored at the time the artifact is made (a cached rerun never links one that is gone).

Rerunning does not repeat work: ``run_id`` is a UUIDv5 of what defines the run (config, parameters,
data fingerprint — the file's SHA-256, or the database range —, sweep id and code version), the task's
``cache_key_fn`` is the same digest plus the target database and output directory, and a run whose
``run_id`` is already stored is read back instead of recomputed (also after the cache expired). The
default ``sweep_id`` is derived the same way from the grid, so a rerun sweep is the same sweep.

Retries: the flows' one rule (``flows._retry``): a task is retried only for the retryable family of
``meltica.errors`` (a database blip, also mid-sweep), never for a refused login, a bad configuration or bad data.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prefect import flow, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows import config_file_of, embedded_png, embedded_png_bytes, scrub_secrets_in_logs
from flows._retry import meltica_task
from meltica.backtest.config import BacktestConfig
from meltica.backtest.engine import run_backtest
from meltica.backtest.metrics import Metrics
from meltica.backtest.optimize import LOWER_IS_BETTER, METRIC_NAMES, SweepRun, grid, rank_runs
from meltica.backtest.report import format_metric, write_report
from meltica.backtest.results import BacktestResult, detect_code_version, jsonable
from meltica.config import load_settings
from meltica.errors import ConfigurationError, DataValidationError
from meltica.infra.postgres import database_url
from meltica.marketdata.series import BarSeries
from meltica.reporting.stored import read_report_file, report_file_names, report_url, store_report_directory
from meltica.storage.engine import make_engine
from meltica.storage.tables import backtest_runs
from meltica.strategies.registry import list_strategies

# The run forms offer the registered strategies as a choice (Prefect reads the annotation at run time; a type
# checker cannot see a Literal built from the registry, so it checks a plain str).
if TYPE_CHECKING:
    StrategyName = str
else:
    StrategyName = Literal[tuple(list_strategies())]

_NAMESPACE = uuid.UUID("6f1d3c2a-8a43-4f57-9a1e-0b9e4c1f7d21")
CHARTS = ("equity.png", "drawdown.png", "positions.png")
# The files of a run stored in the database as its report (served by `meltica reports serve`).
REPORT_FILES = ("report.html", *CHARTS, "metrics.json", "trades.csv")
TABLE_METRICS = ("total_return", "sharpe", "max_drawdown", "trades", "win_rate", "final_equity", "fees")


# --- identity, data ----------------------------------------------------------------------------


def _canonical(value: Any) -> str:
    return json.dumps(jsonable(value), sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_fingerprint(
    data_file: str | None, exchange: str, symbol: str, timeframe: str, start: datetime | None, end: datetime | None
) -> str:
    """The file's SHA-256 and the range, or (stored candles) the database range: what the bars are."""
    rng = f"{exchange}|{symbol}|{timeframe}|{start.isoformat() if start else ''}|{end.isoformat() if end else ''}"
    if data_file is None:
        return f"db|{rng}"
    st = Path(data_file).stat()
    return f"sha256:{_file_digest(str(Path(data_file).resolve()), st.st_size, st.st_mtime_ns)}|{rng}"


@functools.lru_cache(maxsize=4)
def _file_bars(path: str, digest: str, exchange: str, symbol: str, timeframe: str) -> BarSeries:
    return BarSeries.from_file(path, exchange=exchange, symbol=symbol, timeframe=timeframe)


def _slice(series: BarSeries, start: datetime | None, end: datetime | None) -> BarSeries:
    lo = bisect.bisect_left(series.ts, start) if start is not None else 0
    hi = bisect.bisect_left(series.ts, end) if end is not None else len(series)
    if lo == 0 and hi == len(series):
        return series
    s = series
    return BarSeries(
        s.exchange,
        s.symbol,
        s.timeframe,
        list(s.ts[lo:hi]),
        list(s.open[lo:hi]),
        list(s.high[lo:hi]),
        list(s.low[lo:hi]),
        list(s.close[lo:hi]),
        list(s.volume[lo:hi]),
    )


def _bars(cfg: BacktestConfig, data_file: str | None, fingerprint: str, db: Any) -> BarSeries:
    if data_file is None:
        return BarSeries.from_database(
            db, exchange=cfg.exchange, symbol=cfg.symbol, timeframe=cfg.timeframe, start=cfg.start, end=cfg.end
        )
    series = _slice(_file_bars(data_file, fingerprint, cfg.exchange, cfg.symbol, cfg.timeframe), cfg.start, cfg.end)
    if len(series) == 0:
        raise DataValidationError(f"{data_file}: no bars in the requested range", reason="no_data")
    return series


# --- the task ----------------------------------------------------------------------------------


def _run_key(config: Mapping[str, Any], fingerprint: str, sweep_id: str | None, code_version: str) -> str:
    return _canonical({"config": config, "data": fingerprint, "sweep": sweep_id, "code": code_version})


def _cache_key(_ctx: TaskRunContext, args: dict[str, Any]) -> str:
    key = _run_key(args["config"], args["fingerprint"], args["sweep_id"], args["code_version"])
    extra = _canonical({"db": args["db_url"], "out": args["output_dir"]})
    return hashlib.sha256((key + extra).encode()).hexdigest()


def _summary(result: BacktestResult, report_dir: Path | None) -> dict[str, Any]:
    files: dict[str, str] = {}
    if report_dir is not None:
        for name in ("report.html", *CHARTS, "metrics.json"):
            if (report_dir / name).exists():
                files[name] = (report_dir / name).resolve().as_uri()
    return {
        "run_id": str(result.run_id),
        "sweep_id": str(result.sweep_id) if result.sweep_id else None,
        "strategy": result.strategy,
        "params": jsonable(result.params),
        "metrics": result.metrics,
        "files": files,
    }


@meltica_task(
    "backtest run",
    name="backtest-run",
    task_run_name="backtest {label}",
    cache_key_fn=_cache_key,
    cache_expiration=timedelta(days=7),
)
def run_backtest_task(
    config: dict[str, Any],
    data_file: str | None,
    fingerprint: str,
    db_url: str,
    output_dir: str | None,
    sweep_id: str | None,
    code_version: str,
    label: str = "",
    keep_report: bool = True,
) -> dict[str, Any]:
    """Run (or read back) one backtest (``label`` names the task run: strategy, symbol, grid point); save it,
    write its files and report; store the report for ``meltica reports serve`` when ``keep_report`` (a sweep
    stores only its best run's: a report is ~5 MB, plotly.js inlined); return a small summary."""
    cfg = BacktestConfig.create(config)
    run_id = uuid.uuid5(_NAMESPACE, _run_key(config, fingerprint, sweep_id, code_version))
    report_dir = Path(output_dir) / str(run_id) if output_dir else None
    db = make_engine(db_url)
    try:
        with db.connect() as conn:
            stored = conn.execute(backtest_runs.select().where(backtest_runs.c.run_id == run_id)).first()
        if stored is not None:
            result = BacktestResult.load(db, run_id)
            if keep_report and report_dir is not None and (report_dir / "report.html").is_file():
                _store_report(db, result, report_dir)  # a no-op when it is stored already
        else:
            bars = _bars(cfg, data_file, fingerprint, db)
            result = run_backtest(cfg, bars)
            result = replace(result, run_id=run_id, sweep_id=uuid.UUID(sweep_id) if sweep_id else None)
            result.save(db)
            if report_dir is not None or keep_report:
                with tempfile.TemporaryDirectory(prefix="meltica-report-") as scratch:
                    # Without an output directory the report is still made, to be stored and served.
                    written = report_dir if report_dir is not None else Path(scratch)
                    result.write_files(written)
                    write_report(result, written, prices={cfg.symbol: bars.closes()})
                    if keep_report:
                        _store_report(db, result, written)
    finally:
        db.dispose()
    return _summary(result, report_dir)


def _store_report(db: Any, result: BacktestResult, directory: Path) -> None:
    title = f"backtest {result.strategy} {' '.join(result.symbols)} {_canonical(jsonable(result.params))}"
    store_report_directory(db, result.run_id, "backtest", title, directory, REPORT_FILES)


# --- flows -------------------------------------------------------------------------------------


def _config(
    strategy: str,
    params: Mapping[str, Any],
    exchange: str,
    symbol: str,
    timeframe: str,
    start: datetime | None,
    end: datetime | None,
    fill_model: Mapping[str, Any] | None,
) -> dict[str, Any]:
    values: dict[str, Any] = {
        "strategy": strategy,
        "params": dict(params),
        "exchange": exchange,
        "symbol": symbol,
        "timeframe": timeframe,
        "start": start,
        "end": end,
        **dict(fill_model or {}),
    }
    cfg = BacktestConfig.create(values)  # fail fast, before any task runs: ConfigurationError is terminal
    dumped: dict[str, Any] = jsonable(cfg.model_dump(exclude_none=True, exclude_defaults=False))
    return dumped


def _metric_cell(metrics: Metrics, name: str) -> str:
    value = getattr(metrics, name)
    return format_metric(name, value)


@meltica_task("storing the best run's report", name="store-best-report", task_run_name="store report {run}")
def store_best_report(run: str, files: dict[str, str], db_url: str, title: str) -> bool:
    """Store the sweep's best run's report from its files on the worker (the sweep's tasks store none); False when
    its files are not there (no ``output_dir``, or cleaned since a cached run)."""
    from urllib.parse import unquote, urlsplit

    if "report.html" not in files:
        return False
    directory = Path(unquote(urlsplit(files["report.html"]).path)).parent
    if not (directory / "report.html").is_file():
        return False
    db = make_engine(db_url)
    try:
        store_report_directory(db, uuid.UUID(run), "backtest", title, directory, REPORT_FILES)
    finally:
        db.dispose()
    return True


@meltica_task("reading the stored report", name="report-links", task_run_name="report links {prefix}")
def charts_markdown(run: str, files: dict[str, str], db_url: str, reports_url: str, prefix: str) -> str:
    """The charts artifact's markdown: the run's charts embedded (visible in the UI) and a link to its full
    report served by ``meltica reports serve`` — read from the database when the artifact is made, so a cached
    rerun never links a report that is not stored (nor embeds a chart that is gone)."""
    from urllib.parse import unquote, urlsplit

    run_id = uuid.UUID(run)
    db = make_engine(db_url)
    try:
        stored = set(report_file_names(db, run_id))
        parts = [f"### Charts of backtest run `{run_id}`\n"]
        for name in CHARTS:
            chart = read_report_file(db, run_id, name) if name in stored else None
            if chart is not None:
                parts.append(embedded_png_bytes(chart.body, name))
            elif name in files:
                parts.append(embedded_png(unquote(urlsplit(files[name]).path), name))
    finally:
        db.dispose()
    if "report.html" in stored:
        links = " · ".join(f"[{name}]({report_url(reports_url, run_id, name)})" for name in sorted(stored))
        parts.append(
            f"**[Full report]({report_url(reports_url, run_id)})** (served by `meltica reports serve`)\n\n"
            f"Files: {links}"
        )
    else:
        parts.append("_The full report of this run is not stored in the database: no link._")
    if "report.html" in files:
        parts.append(f"Files on the worker: `{unquote(urlsplit(files['report.html']).path).rsplit('/', 1)[0]}/`")
    return "\n\n".join(parts) + "\n"


def _charts(summary: Mapping[str, Any], prefix: str, db_url: str) -> None:
    """One markdown artifact with the run's charts and the link to its stored report (:func:`charts_markdown`)."""
    reports_url = load_settings(config_file=config_file_of(None)).reports_url
    create_markdown_artifact(
        key=f"{prefix}-charts",
        markdown=charts_markdown(summary["run_id"], dict(summary["files"]), db_url, reports_url, prefix),
        description=f"Equity, drawdown and position charts of backtest run {summary['run_id']}; its full report",
    )


@flow(
    name="backtest",
    flow_run_name="backtest {strategy} {symbol} {timeframe}",
    validate_parameters=True,
)
def backtest(
    strategy: StrategyName,
    params: dict[str, Any] | None = None,
    symbol: str = "BTC/USDT",
    exchange: str = "binance",
    timeframe: str = "1m",
    start: datetime | None = None,
    end: datetime | None = None,
    data_file: str | None = None,
    fill_model: dict[str, Any] | None = None,
    output_dir: str | None = "out/backtests",
    database: str | None = None,
) -> dict[str, Any]:
    """One backtest; returns the summary (run id, metrics, file URLs). The parameters are checked against the
    strategy's parameter model before any task runs (a bad value fails the run at once, naming the field).

    Args:
        strategy: A registered strategy.
        params: The strategy's parameters, e.g. {"fast": 10, "slow": 40, "quantity": "0.01"}.
        symbol: Market symbol, e.g. BTC/USDT.
        exchange: Exchange whose stored candles are used (without data_file).
        timeframe: Bar timeframe, e.g. 1m, 1h.
        start: First bar (UTC); empty: from the first available bar.
        end: End of the bar range (UTC, exclusive); empty: to the last available bar.
        data_file: A candle file (CSV, Feather, Parquet) on the worker; empty: the stored candles.
        fill_model: Fill model and account fields: maker_fee_bps, taker_fee_bps, slippage_bps, latency_ms,
            bar_volume_share, fill_on_touch, initial_balances.
        output_dir: Directory on the worker for the run's files (relative: in the deployed checkout).
        database: Database URL; empty: the configured database (MELTICA_DATABASE_URL). A password here is masked in
            Prefect's copy.
    """
    scrub_secrets_in_logs()
    config = _config(strategy, params or {}, exchange, symbol, timeframe, start, end, fill_model)
    fingerprint = data_fingerprint(data_file, exchange, symbol, timeframe, start, end)
    db_url = database or database_url()
    summary: dict[str, Any] = run_backtest_task(
        config,
        data_file,
        fingerprint,
        db_url,
        output_dir,
        None,
        detect_code_version(),
        f"{strategy} {symbol} {timeframe}",
    )
    metrics: Metrics = summary["metrics"]
    rows = "\n".join(f"| {name} | {_metric_cell(metrics, name)} |" for name in METRIC_NAMES)
    create_markdown_artifact(
        key="backtest-metrics",
        markdown=(
            f"### Backtest {strategy} on {exchange} {symbol} {timeframe}\n\n"
            f"run `{summary['run_id']}` · params `{_canonical(summary['params'])}`"
            f"\n\n| metric | value |\n|---|---|\n{rows}\n"
        ),
        description="Metrics of the backtest run (stored in backtest_runs / backtest_metrics)",
    )
    _charts(summary, "backtest", db_url)
    return summary


@flow(
    name="backtest-sweep",
    flow_run_name="sweep {strategy} {symbol} {timeframe} by {objective}",
    task_runner=ThreadPoolTaskRunner(max_workers=8),  # type: ignore[arg-type]
    validate_parameters=True,
)
def sweep(
    strategy: StrategyName,
    grid_space: dict[str, list[Any]],
    base_params: dict[str, Any] | None = None,
    symbol: str = "BTC/USDT",
    exchange: str = "binance",
    timeframe: str = "1m",
    start: datetime | None = None,
    end: datetime | None = None,
    data_file: str | None = None,
    fill_model: dict[str, Any] | None = None,
    objective: str = "sharpe",
    maximize: bool | None = None,
    workers: int = 4,
    sweep_id: str | None = None,
    output_dir: str | None = "out/sweeps",
    database: str | None = None,
) -> dict[str, Any]:
    """Backtest every valid point of ``grid_space`` (over ``base_params``) as concurrent tasks (at most
    ``workers`` at once), store them under one ``sweep_id`` and rank them by ``objective``. Every grid point is
    checked against the strategy's parameter model before any task runs; each task run is named by its point.

    Args:
        strategy: A registered strategy.
        grid_space: Values to try per parameter, e.g. {"fast": [5, 10], "slow": [20, 40]}.
        base_params: Parameters shared by every grid point, e.g. {"quantity": "0.01"}.
        symbol: Market symbol, e.g. BTC/USDT.
        exchange: Exchange whose stored candles are used (without data_file).
        timeframe: Bar timeframe, e.g. 1m, 1h.
        start: First bar (UTC); empty: from the first available bar.
        end: End of the bar range (UTC, exclusive); empty: to the last available bar.
        data_file: A candle file (CSV, Feather, Parquet) on the worker; empty: the stored candles.
        fill_model: Fill model and account fields: maker_fee_bps, taker_fee_bps, slippage_bps, latency_ms,
            bar_volume_share, fill_on_touch, initial_balances.
        objective: The metric the runs are ranked by (sharpe, total_return, max_drawdown, ...).
        maximize: Whether higher is better; empty: the metric's own sense (max_drawdown: lower).
        workers: Backtests run at once.
        sweep_id: Id to store the runs under; empty: derived from the grid and the data (a rerun is the same sweep).
        output_dir: Directory on the worker for the runs' files (relative: in the deployed checkout).
        database: Database URL; empty: the configured database (MELTICA_DATABASE_URL). A password here is masked in
            Prefect's copy.
    """
    scrub_secrets_in_logs()
    if objective not in METRIC_NAMES:
        raise ConfigurationError(f"unknown objective {objective!r}", field="objective")
    maximize = (objective not in LOWER_IS_BETTER) if maximize is None else maximize
    sets = grid(grid_space, strategy=strategy, base=base_params or {})
    if len(sets) == 0:
        raise ConfigurationError("the grid has no valid parameter set", field="grid_space")
    configs = [
        _config(strategy, {**(base_params or {}), **p}, exchange, symbol, timeframe, start, end, fill_model)
        for p in sets
    ]
    fingerprint = data_fingerprint(data_file, exchange, symbol, timeframe, start, end)
    code_version = detect_code_version()
    sid = sweep_id or str(uuid.uuid5(_NAMESPACE, _canonical({"configs": configs, "data": fingerprint})))
    out = str(Path(output_dir) / sid) if output_dir else None
    db_url = database or database_url()
    # Each task run is named by its grid point (the parameters that vary), e.g. "momentum BTC/USDT fast=5 slow=40".
    labels = [f"{strategy} {symbol} " + " ".join(f"{k}={p.get(k)}" for k in sorted(grid_space)) for p in sets]
    summaries: list[dict[str, Any]] = []
    step = max(1, workers)
    for i in range(0, len(configs), step):
        futures = run_backtest_task.map(
            configs[i : i + step],
            unmapped(data_file),
            unmapped(fingerprint),
            unmapped(db_url),
            unmapped(out),
            unmapped(sid),
            unmapped(code_version),
            labels[i : i + step],
            unmapped(False),
        )
        wait(list(futures))
        summaries.extend(f.result() for f in futures)
    runs = [
        SweepRun(index=i, params=dict(p), metrics=s["metrics"], run_id=uuid.UUID(s["run_id"]))
        for i, (p, s) in enumerate(zip(sets, summaries, strict=True))
    ]
    ranked = rank_runs(runs, objective, maximize)
    by_run = {s["run_id"]: s for s in summaries}
    best = by_run[str(ranked[0].run_id)]
    varying = sorted(grid_space)
    header = "| rank | " + " | ".join(varying) + " | " + " | ".join(TABLE_METRICS) + " | run |"
    sep = "|---" * (len(varying) + len(TABLE_METRICS) + 2) + "|"
    lines = []
    for r in ranked:
        assert r.metrics is not None
        run_cell = f"`{str(r.run_id)[:8]}`"
        lines.append(
            f"| {r.rank} | "
            + " | ".join(str(r.params.get(k)) for k in varying)
            + " | "
            + " | ".join(_metric_cell(r.metrics, m) for m in TABLE_METRICS)
            + f" | {run_cell} |"
        )
    create_markdown_artifact(
        key="sweep-results",
        markdown=(
            f"### Sweep {strategy} on {exchange} {symbol} {timeframe}\n\n"
            f"sweep `{sid}` · {len(ranked)} runs ({sets.skipped} invalid points skipped) · ranked by "
            f"`{objective}` ({'higher' if maximize else 'lower'} is better)\n\n"
            f"**Best parameters**: `{_canonical(best['params'])}` "
            f"({objective} {_metric_cell(best['metrics'], objective)})\n\n"
            + header
            + "\n"
            + sep
            + "\n"
            + "\n".join(lines)
            + "\n"
        ),
        description="Backtests of the sweep, best first (stored in backtest_runs under the sweep id)",
    )
    title = f"backtest {strategy} {symbol} {_canonical(best['params'])} (best of sweep {sid})"
    store_best_report(best["run_id"], dict(best["files"]), db_url, title)
    _charts(best, "sweep-best", db_url)
    return {
        "sweep_id": sid,
        "objective": objective,
        "maximize": maximize,
        "skipped": sets.skipped,
        "best": {"run_id": best["run_id"], "params": best["params"]},
        "runs": [
            {
                "rank": r.rank,
                "run_id": str(r.run_id),
                "params": jsonable(r.params),
                objective: jsonable(getattr(r.metrics, objective)),
            }
            for r in ranked
        ],
    }
