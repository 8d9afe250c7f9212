"""Parameter sweeps: grid and random parameter sets, evaluated on every core, ranked, optionally stored.

* ``grid(space, strategy=...)`` / ``random_search(strategy, n, seed=...)`` produce parameter sets, each
  validated against the strategy's ``Params`` model; invalid points (``fast >= slow``) are skipped and
  counted, never evaluated.
* ``run_sweep(evaluate, param_sets, workers=..., objective=...)`` evaluates them in a
  ``ProcessPoolExecutor`` (spawn start method: nothing relies on fork) and ranks them by a ``Metrics``
  field. ``evaluate`` is sent to each worker **once** (through the pool initializer), never per task;
  data should travel by path: ``VectorEvaluator`` / ``EngineEvaluator`` hold a file path and load the
  bars once per worker process (``shared_bars``). Tasks are chunks of parameter sets; a worker keeps its
  per-data caches (the vector path's per-span EMAs) across tasks and stores a chunk's runs together.
* Storage is optional: with ``store=`` (an SQLAlchemy ``Engine`` or URL) every run is saved with
  ``BacktestResult.save`` under one ``sweep_id``, by the worker that computed it (workers return only
  metrics, never equity curves).

Ranking: by the objective (descending, or ascending for "lower is better" metrics such as
``max_drawdown``); NaN last; ties broken by the parameter set's position in the input, so the ranking is
deterministic whatever the worker count or completion order.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import multiprocessing
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine

from meltica.backtest.config import BacktestConfig
from meltica.backtest.engine import run_backtest
from meltica.backtest.metrics import Metrics
from meltica.backtest.results import BacktestResult, jsonable
from meltica.backtest.vector import Bars, EmaCache, Mode, SimConfig, VectorRun, ema_cross, load_bars, run_to_result
from meltica.errors import ConfigurationError
from meltica.strategies import param_space, validate_params

Params = dict[str, Any]
Evaluate = Callable[[Mapping[str, Any]], Any]
"""``evaluate(params)`` returns a ``Metrics``, a ``BacktestResult``, a ``VectorRun`` or a mapping of
metric name → value."""

LOWER_IS_BETTER = frozenset({"max_drawdown", "max_drawdown_duration", "volatility", "fees", "turnover"})
METRIC_NAMES = tuple(f.name for f in fields(Metrics))


# --- parameter sets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSets:
    """Validated parameter sets (input order kept) and what was skipped: ``invalid`` failed the
    strategy's model (``reasons`` keeps the first few messages), ``duplicates`` repeated an earlier set."""

    params: list[Params]
    invalid: int = 0
    duplicates: int = 0
    reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.params)

    def __iter__(self) -> Any:
        return iter(self.params)

    @property
    def skipped(self) -> int:
        return self.invalid + self.duplicates


def _validator(strategy: str | None, base: Mapping[str, Any]) -> Callable[[Params], str | None]:
    def check(candidate: Params) -> str | None:
        if strategy is None:
            return None

        try:
            validate_params(strategy, {**base, **candidate})
        except ConfigurationError as exc:
            return str(exc)
        return None

    return check


def _key(params: Mapping[str, Any]) -> str:
    return json.dumps(jsonable(dict(params)), sort_keys=True)


def grid(
    space: Mapping[str, Sequence[Any]], *, strategy: str | None = None, base: Mapping[str, Any] | None = None
) -> ParamSets:
    """Every combination of ``space`` (the product, first key varying slowest), merged over ``base`` and
    validated against ``strategy``'s model when given; invalid combinations are skipped and counted."""
    base = dict(base or {})
    check = _validator(strategy, base)
    names = list(space)
    out: list[Params] = []
    seen: set[str] = set()
    invalid = dup = 0
    reasons: list[str] = []
    for values in itertools.product(*(list(space[n]) for n in names)):
        candidate = {**base, **dict(zip(names, values, strict=True))}
        problem = check(candidate)
        if problem is not None:
            invalid += 1
            if len(reasons) < 5:
                reasons.append(problem)
            continue
        key = _key(candidate)
        if key in seen:
            dup += 1
            continue
        seen.add(key)
        out.append(candidate)
    return ParamSets(out, invalid, dup, reasons)


def random_search(
    strategy: str,
    n: int,
    *,
    seed: int = 0,
    ranges: Mapping[str, tuple[Any, Any]] | None = None,
    base: Mapping[str, Any] | None = None,
    max_attempts: int | None = None,
) -> ParamSets:
    """Up to ``n`` distinct valid parameter sets drawn uniformly (``random.Random(seed)``: reproducible).

    The sampled parameters are the keys of ``ranges`` (``(low, high)``, inclusive; intersected with the
    model's bounds from ``param_space``) or, without ``ranges``, every numeric parameter whose model
    bounds are finite on both sides. Integers are drawn from ``low..high``, floats and decimals uniformly
    (decimals rounded to 8 places). Draws failing the model are skipped and counted; sampling stops
    after ``max_attempts`` draws (default ``20 × n``)."""
    specs = param_space(strategy)
    bounds: dict[str, tuple[str, float, float]] = {}
    chosen = ranges if ranges is not None else {}
    names = list(chosen) if ranges is not None else list(specs)
    for name in names:
        spec = specs.get(name)
        if spec is None:
            raise ConfigurationError(f"strategy {strategy!r} has no numeric parameter {name!r}", field=name)
        lo_spec = spec.ge if spec.ge is not None else spec.gt
        hi_spec = spec.le if spec.le is not None else spec.lt
        lo, hi = chosen.get(name, (lo_spec, hi_spec))
        lo = lo_spec if lo is None else (max(lo, lo_spec) if lo_spec is not None else lo)
        hi = hi_spec if hi is None else (min(hi, hi_spec) if hi_spec is not None else hi)
        if lo is None or hi is None:
            if ranges is None:
                continue  # unbounded and not asked for: keep the default
            raise ConfigurationError(f"parameter {name!r} needs a finite range", field=name)
        if float(lo) > float(hi):
            raise ConfigurationError(f"parameter {name!r}: empty range {lo}..{hi}", field=name)
        bounds[name] = (spec.kind, float(lo), float(hi))
    rng = random.Random(seed)  # noqa: S311 - reproducible sampling, not cryptography
    base = dict(base or {})
    check = _validator(strategy, base)
    out: list[Params] = []
    seen: set[str] = set()
    invalid = dup = 0
    reasons: list[str] = []
    attempts = max_attempts if max_attempts is not None else 20 * n
    for _ in range(attempts):
        if len(out) >= n:
            break
        candidate: Params = dict(base)
        for name, (kind, lo, hi) in bounds.items():
            if kind == "int":
                candidate[name] = rng.randint(math.ceil(lo), math.floor(hi))
            elif kind == "float":
                candidate[name] = rng.uniform(lo, hi)
            else:
                candidate[name] = Decimal(repr(round(rng.uniform(lo, hi), 8)))
        problem = check(candidate)
        if problem is not None:
            invalid += 1
            if len(reasons) < 5:
                reasons.append(problem)
            continue
        key = _key(candidate)
        if key in seen:
            dup += 1
            continue
        seen.add(key)
        out.append(candidate)
    return ParamSets(out, invalid, dup, reasons)


# --- per-process data --------------------------------------------------------------------------

_BARS: dict[tuple[str, int, int | None], Bars] = {}
_EMAS: dict[tuple[str, int, int | None], EmaCache] = {}


def shared_bars(path: str | Path, start: int = 0, stop: int | None = None) -> Bars:
    """The bars of ``path`` (``[start:stop]``), loaded once per process and cached."""
    key = (str(Path(path).resolve()), start, stop)
    got = _BARS.get(key)
    if got is None:
        full_key = (key[0], 0, None)
        full = _BARS.get(full_key)
        if full is None:
            full = _BARS[full_key] = load_bars(key[0])
        got = _BARS[key] = (
            full if (start, stop) == (0, None) else full.slice(start, len(full) if stop is None else stop)
        )
    return got


def _shared_emas(path: str | Path, start: int, stop: int | None) -> EmaCache:
    key = (str(Path(path).resolve()), start, stop)
    got = _EMAS.get(key)
    if got is None:
        got = _EMAS[key] = EmaCache(shared_bars(path, start, stop).close)
    return got


@dataclass(frozen=True)
class VectorEvaluator:
    """``evaluate`` for the vectorised EMA crossover (``meltica.backtest.vector``): picklable, holds only
    a path. ``params`` needs ``fast`` and ``slow``; ``quantity`` and ``allow_short`` override the config.
    ``mode`` is ``"cross"`` for the ``momentum`` strategy's rule."""

    data: str
    quantity: float = 1.0
    fee_rate: float = 0.001
    initial_cash: float = 1_000_000.0
    allow_short: bool = False
    mode: Mode = "cross"
    start: int = 0
    stop: int | None = None
    strategy: str = "momentum"
    exchange: str = "vector"
    symbol: str = "BTC/USDT"
    timeframe: str | None = None

    def config(self, params: Mapping[str, Any]) -> SimConfig:
        return SimConfig(
            quantity=float(params.get("quantity", self.quantity)),
            fee_rate=self.fee_rate,
            initial_cash=self.initial_cash,
            allow_short=bool(params.get("allow_short", self.allow_short)),
            mode=self.mode,
        )

    def run(self, params: Mapping[str, Any], *, keep_equity: bool = False) -> VectorRun:
        bars = shared_bars(self.data, self.start, self.stop)
        cache = _shared_emas(self.data, self.start, self.stop)
        return ema_cross(
            bars,
            int(params["fast"]),
            int(params["slow"]),
            self.config(params),
            cache=cache,
            params=params,
            keep_equity=keep_equity,
        )

    def __call__(self, params: Mapping[str, Any]) -> VectorRun:
        return self.run(params)

    def to_result(self, params: Mapping[str, Any], output: Any) -> BacktestResult:
        """The full ``BacktestResult`` of one run (re-run keeping its equity curve), for storage."""
        run = self.run(params, keep_equity=True)
        return run_to_result(  # type: ignore[no-any-return]
            run,
            shared_bars(self.data, self.start, self.stop),
            strategy=self.strategy,
            exchange=self.exchange,
            symbol=self.symbol,
            timeframe=self.timeframe,
            cfg=self.config(params),
        )


@dataclass(frozen=True)
class EngineEvaluator:
    """``evaluate`` through the event-driven engine (``meltica.backtest.engine.run_backtest``): picklable,
    holds a bars file path and the config fields common to every run; ``params`` become the strategy's
    parameters (over ``base_params``). Returns the full ``BacktestResult`` (stored as is)."""

    data: str
    config: Mapping[str, Any] = field(default_factory=dict)
    base_params: Mapping[str, Any] = field(default_factory=dict)
    start: int = 0
    stop: int | None = None

    def __call__(self, params: Mapping[str, Any]) -> BacktestResult:
        bars = shared_bars(self.data, self.start, self.stop)
        cfg = BacktestConfig.create(dict(self.config), params={**self.base_params, **params})
        return run_backtest(cfg, bars.as_mapping())


# --- the sweep ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepRun:
    """One evaluated parameter set: ``index`` is its position in the input; ``rank`` 1 is the best.
    ``error`` is set (and ``metrics`` ``None``) when its evaluation raised."""

    index: int
    params: Params
    metrics: Metrics | None
    run_id: uuid.UUID | None = None
    error: str | None = None
    seconds: float = 0.0
    rank: int = 0

    def value(self, objective: str) -> float:
        if self.metrics is None:
            return math.nan
        raw = getattr(self.metrics, objective)
        return raw.total_seconds() if isinstance(raw, timedelta) else float(raw)


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep: ``runs`` ranked best first (failed runs in ``failed``), timing and throughput."""

    sweep_id: uuid.UUID
    objective: str
    maximize: bool
    runs: list[SweepRun]
    failed: list[SweepRun]
    skipped: int
    seconds: float
    workers: int
    stored: int = 0
    path: str = "engine"  # engine (exact: what `meltica backtest` gives) or vector
    inexact: str | None = None  # why this path's numbers may differ from the engine's, when they may

    @property
    def best(self) -> SweepRun | None:
        return self.runs[0] if self.runs else None

    def top(self, n: int) -> list[SweepRun]:
        return self.runs[:n]

    @property
    def evaluations(self) -> int:
        """Bar-evaluations: the sum of every run's bars (``Metrics.periods``)."""
        return sum(r.metrics.periods for r in self.runs if r.metrics is not None)

    @property
    def evaluations_per_second(self) -> float:
        return self.evaluations / self.seconds if self.seconds > 0 else math.inf

    def rows(self, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One flat row per ranked run: rank, run id, the parameters, then the metrics (JSON-ready)."""
        names = list(columns) if columns is not None else list(METRIC_NAMES)
        out: list[dict[str, Any]] = []
        for r in self.runs:
            row: dict[str, Any] = {"rank": r.rank, "index": r.index, "run_id": str(r.run_id) if r.run_id else None}
            row.update({f"param.{k}": jsonable(v) for k, v in r.params.items()})
            if r.metrics is not None:
                row.update({k: jsonable(getattr(r.metrics, k)) for k in names})
            out.append(row)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "sweep_id": str(self.sweep_id),
            "path": self.path,
            "exact": self.inexact is None,
            "inexact": self.inexact,
            "objective": self.objective,
            "maximize": self.maximize,
            "workers": self.workers,
            "seconds": self.seconds,
            "evaluations": self.evaluations,
            "evaluations_per_second": jsonable(self.evaluations_per_second),
            "skipped": self.skipped,
            "stored": self.stored,
            "runs": self.rows(),
            "failed": [{"index": r.index, "params": jsonable(r.params), "error": r.error} for r in self.failed],
        }

    def write(self, directory: str | Path) -> list[Path]:
        """``sweep.csv`` (ranked rows) and ``sweep.json`` (everything) in ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        header: list[str] = []
        for row in rows:
            header.extend(k for k in row if k not in header)
        csv_path = out / "sweep.csv"
        with csv_path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=header or ["rank"])
            writer.writeheader()
            writer.writerows(rows)
        json_path = out / "sweep.json"
        json_path.write_text(json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        return [csv_path, json_path]


def _as_metrics(output: Any) -> Metrics:
    if isinstance(output, Metrics):
        return output
    if isinstance(output, BacktestResult | VectorRun):
        return output.metrics
    if isinstance(output, Mapping):
        known = {f.name: f for f in fields(Metrics)}
        zero: dict[str, Any] = {
            name: (
                Decimal(0)
                if f.type in ("Decimal", Decimal)
                else timedelta(0)
                if f.type in ("timedelta", timedelta)
                else True
                if f.type in ("bool", bool)
                else 0
                if f.type in ("int", int)
                else 0.0
            )
            for name, f in known.items()
        }
        zero.update({k: v for k, v in output.items() if k in known})
        return Metrics(**zero)
    raise TypeError(f"evaluate returned {type(output).__name__}; expected Metrics, BacktestResult or VectorRun")


# Worker state: set once per process by the pool initializer.
_WORKER: dict[str, Any] = {}


def _init_worker(
    evaluate: Evaluate,
    store_url: str | None,
    initializer: Callable[..., None] | None,
    initargs: tuple[Any, ...],
) -> None:
    _WORKER.clear()
    _WORKER["evaluate"] = evaluate
    _WORKER["engine"] = create_engine(store_url, pool_size=1, max_overflow=0) if store_url else None
    if initializer is not None:
        initializer(*initargs)


def _to_result(evaluate: Evaluate, params: Params, output: Any) -> BacktestResult:
    if isinstance(output, BacktestResult):
        return output
    to_result = getattr(evaluate, "to_result", None)
    if to_result is None:
        raise TypeError("storing a sweep needs evaluate to return BacktestResult or to have a to_result method")
    result: BacktestResult = to_result(params, output)
    return result


def _run_chunk(
    chunk: Sequence[tuple[int, Params]], sweep_id: uuid.UUID, *, state: Mapping[str, Any] | None = None
) -> list[SweepRun]:
    """Evaluate a chunk of parameter sets in this process; store the chunk's runs together if asked."""
    st = state if state is not None else _WORKER
    evaluate: Evaluate = st["evaluate"]
    engine: Engine | None = st.get("engine")
    out: list[SweepRun] = []
    to_store: list[BacktestResult] = []
    for index, params in chunk:
        started = time.perf_counter()
        try:
            output = evaluate(params)
            metrics = _as_metrics(output)
            run_id: uuid.UUID | None = None
            if engine is not None:
                result = replace(_to_result(evaluate, params, output), sweep_id=sweep_id)
                to_store.append(result)
                run_id = result.run_id
            out.append(SweepRun(index, params, metrics, run_id, seconds=time.perf_counter() - started))
        except Exception as exc:  # one bad parameter set must not sink the sweep: it is reported
            out.append(SweepRun(index, params, None, error=f"{type(exc).__name__}: {exc}"))
    if engine is not None:
        for result in to_store:
            result.save(engine)
    return out


def _engine_url(store: Engine | str | None) -> str | None:
    if store is None:
        return None
    if isinstance(store, Engine):
        return store.url.render_as_string(hide_password=False)
    return str(store)


def rank_runs(runs: Iterable[SweepRun], objective: str, maximize: bool) -> list[SweepRun]:
    """Best first by ``objective``; NaN last; ties by input position. Sets ``rank`` (1-based)."""

    def key(r: SweepRun) -> tuple[int, float, int]:
        v = r.value(objective)
        if math.isnan(v):
            return (1, 0.0, r.index)
        return (0, -v if maximize else v, r.index)

    ordered = sorted(runs, key=key)
    return [replace(r, rank=i) for i, r in enumerate(ordered, start=1)]


def run_sweep(
    evaluate: Evaluate,
    param_sets: Iterable[Mapping[str, Any]],
    *,
    workers: int | None = None,
    objective: str = "sharpe",
    maximize: bool | None = None,
    store: Engine | str | None = None,
    sweep_id: uuid.UUID | None = None,
    chunksize: int | None = None,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
    progress: Callable[[int, int], None] | None = None,
    mp_context: str | None = None,
) -> SweepResult:
    """Evaluate every parameter set and rank them (module docstring).

    ``workers``: processes (default ``os.cpu_count()``); ``1`` runs in this process (no pool).
    ``objective``: a ``Metrics`` field; ``maximize`` defaults to ``False`` for ``LOWER_IS_BETTER`` fields.
    ``store``: save every run's ``BacktestResult`` under ``sweep_id`` (generated when not given).
    ``chunksize``: parameter sets per task (default: about four tasks per worker).
    ``initializer(*initargs)`` runs once in each worker (and once here when ``workers == 1``).
    ``progress(done, total)`` is called as chunks complete.
    ``mp_context``: the multiprocessing start method; default ``"forkserver"`` where available (a clean
    server process that has imported this module once forks the workers: no fork of this possibly
    threaded process, and no per-worker re-import as with ``"spawn"``), else ``"spawn"``. Both pickle
    ``evaluate`` and the parameter sets, so the same code runs under either."""
    if objective not in METRIC_NAMES:
        raise ConfigurationError(f"unknown objective {objective!r} (one of {', '.join(METRIC_NAMES)})")
    maximize = (objective not in LOWER_IS_BETTER) if maximize is None else maximize
    skipped = param_sets.skipped if isinstance(param_sets, ParamSets) else 0
    tasks = [(i, dict(p)) for i, p in enumerate(param_sets)]
    n_workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    size = chunksize or max(1, math.ceil(len(tasks) / (n_workers * 4)))
    chunks = [tasks[i : i + size] for i in range(0, len(tasks), size)]
    sid = sweep_id or uuid.uuid4()
    url = _engine_url(store)
    started = time.perf_counter()
    done: list[SweepRun] = []
    if n_workers == 1:
        if initializer is not None:
            initializer(*initargs)
        engine = store if isinstance(store, Engine) else (create_engine(url) if url else None)
        state = {"evaluate": evaluate, "engine": engine}
        for chunk in chunks:
            done.extend(_run_chunk(chunk, sid, state=state))
            if progress is not None:
                progress(len(done), len(tasks))
    else:
        method = mp_context or ("forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
        ctx = multiprocessing.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload(["meltica.backtest.optimize", "pandas"])
        with ProcessPoolExecutor(
            max_workers=n_workers,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(evaluate, url, initializer, initargs),
        ) as pool:
            futures = [pool.submit(_run_chunk, chunk, sid) for chunk in chunks]
            for fut in as_completed(futures):
                done.extend(fut.result())
                if progress is not None:
                    progress(len(done), len(tasks))
    seconds = time.perf_counter() - started
    ok = [r for r in done if r.metrics is not None]
    failed = sorted((r for r in done if r.metrics is None), key=lambda r: r.index)
    return SweepResult(
        sweep_id=sid,
        objective=objective,
        maximize=maximize,
        runs=rank_runs(ok, objective, maximize),
        failed=failed,
        skipped=skipped,
        seconds=seconds,
        workers=n_workers,
        stored=sum(1 for r in ok if r.run_id is not None),
    )
