"""Backtest benchmark: one EMA 10/50 crossover workload, bars per second, on Meltica and its peers.

One invocation runs, one after another, each in its own subprocess of the right interpreter:

* ``meltica``        — ``bench/peers/meltica_engine.py`` in ``/work/main/.venv`` (skipped, with a message,
  until ``meltica.backtest.engine`` exists);
* ``backtrader``     — ``bench/peers/backtrader_engine.py`` in ``bench/.venv``;
* ``nautilus``       — ``bench/peers/nautilus_engine.py`` in ``bench/.venv``;
* ``vectorbt``       — ``bench/peers/vectorbt_engine.py`` in ``bench/.venv``;
* ``reference``      — ``bench/peers/reference_loop.py`` (plain Python loop, the workload's definition,
  in Meltica's interpreter; a correctness yardstick, not a contender);

and then the parameter-sweep path (10 x 10 EMA pairs) for vectorbt and, when it exists, Meltica.

Data: the shipped 45,031 1-minute BTCUSDT-perp bars repeated until at least ``--bars`` (default
1,000,000: 23 copies, 1,035,713 bars), each copy shifted 45,031 minutes later, prices unchanged; built
once into ``bench/.cache/`` (git-ignored). ``bench/.venv`` (backtrader, vectorbt, nautilus_trader,
pinned below) is created / completed with ``uv`` on first use.

Usage::

    .venv/bin/python bench/backtest_bench.py            # full: >= 1M bars (about 5 minutes on 2 cores)
    .venv/bin/python bench/backtest_bench.py --quick    # >= 200k bars (5 copies)
    .venv/bin/python bench/backtest_bench.py --engines backtrader,vectorbt --no-sweep

Timing is the engine's backtest loop only (imports, data loading and object building excluded, reported
as ``load s``); peak RSS is the subprocess's ``ru_maxrss`` (whole process, data included). Not a test:
nothing asserts on speed. See ``bench/README.md`` for the workload, the per-peer deviations and the
Meltica plug-in signature.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = HERE / "peers"
CACHE = HERE / ".cache"
BENCH_VENV = HERE / ".venv"
DATA = ROOT / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
SOURCE_BARS = 45_031
MINUTE_NS = 60_000_000_000

# Versions measured on Python 3.11 (override with MELTICA_BENCH_PEER_SPECS="spec spec ...").
# plotly < 7: vectorbt 1.0.0 registers a template with "scattermapbox", which plotly 7 removed
# (ValueError on `import vectorbt`).
PEER_SPECS = os.environ.get(
    "MELTICA_BENCH_PEER_SPECS",
    "backtrader==1.9.78.123 vectorbt==1.0.0 plotly<7 nautilus_trader==1.221.0",
).split()

# name -> (runner module, interpreter kind, import probe in that interpreter)
ENGINES: dict[str, tuple[str, str, str]] = {
    "meltica": ("meltica_engine.py", "meltica", ""),
    "backtrader": ("backtrader_engine.py", "peers", "import backtrader"),
    "nautilus": ("nautilus_engine.py", "peers", "import nautilus_trader.backtest.engine"),
    "vectorbt": ("vectorbt_engine.py", "peers", "import vectorbt"),
    "reference": ("reference_loop.py", "meltica", ""),
}
SWEEP_ENGINES = ("meltica", "vectorbt")
PEER_NAMES = ("backtrader", "nautilus", "vectorbt")


# --- data ---------------------------------------------------------------------------------------


def build_bars(min_bars: int) -> Path:
    """``bench/.cache/btc-perp-1m-x{copies}.npz``: the shipped bars repeated, timestamps continued."""
    copies = max(1, math.ceil(min_bars / SOURCE_BARS))
    path = CACHE / f"btc-perp-1m-x{copies}.npz"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    with gzip.open(DATA, "rt") as fh:
        header = fh.readline().strip().split(",")
        assert header == ["timestamp", "open", "high", "low", "close", "volume"], header
        rows = [line.rstrip("\n").split(",") for line in fh]
    ts = np.array([r[0] for r in rows], dtype="datetime64[ns]").astype(np.int64)  # naive = UTC
    cols = {name: np.array([float(r[i]) for r in rows]) for i, name in enumerate(header[1:], start=1)}
    n = len(ts)
    assert n == SOURCE_BARS, n
    assert (np.diff(ts) == MINUTE_NS).all(), "source bars are not contiguous 1-minute bars"
    shift = np.repeat(np.arange(copies, dtype=np.int64) * n * MINUTE_NS, n)
    out: dict[str, Any] = {"ts": np.tile(ts, copies) + shift}
    out.update({name: np.tile(col, copies) for name, col in cols.items()})
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(path)
    return path


# --- interpreters -------------------------------------------------------------------------------


def meltica_python() -> str:
    candidate = ROOT / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def ensure_bench_venv(wanted: list[str]) -> tuple[str | None, dict[str, str]]:
    """``bench/.venv`` with the wanted peers importable; (python or None, {peer: why it is unavailable})."""
    python = BENCH_VENV / "bin" / "python"
    problems: dict[str, str] = {}

    def importable(name: str) -> bool:
        probe = ENGINES[name][2]
        done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            problems[name] = (done.stderr.strip().splitlines() or ["import failed"])[-1]
        return done.returncode == 0

    if python.exists() and all(importable(n) for n in wanted):
        return str(python), {}
    uv = shutil.which("uv")
    if uv is None:
        return None, {n: "uv not found: cannot build bench/.venv" for n in wanted}
    if not python.exists():
        base = f"{sys.version_info.major}.{sys.version_info.minor}"
        if subprocess.run([uv, "venv", "-q", "--python", base, str(BENCH_VENV)], check=False).returncode != 0:
            return None, {n: "uv venv failed" for n in wanted}
    print(f"  installing into {BENCH_VENV}: {' '.join(PEER_SPECS)} (one time) …", file=sys.stderr)
    install = [uv, "pip", "install", "-q", "--python", str(python), *PEER_SPECS]
    if subprocess.run(install, check=False).returncode != 0:
        # Install what can be installed, one spec at a time, so one broken peer does not sink the others.
        for spec in PEER_SPECS:
            subprocess.run([uv, "pip", "install", "-q", "--python", str(python), spec], check=False)
    problems.clear()
    for name in wanted:
        importable(name)
    return str(python), problems


# --- running ------------------------------------------------------------------------------------


def run_engine(python: str, name: str, data: Path, sweep: bool, sweep_chunk: int, timeout: float) -> dict[str, Any]:
    script = PEERS / ENGINES[name][0]
    cmd = [python, str(script), "--data", str(data)]
    if sweep:
        cmd += ["--sweep", "--sweep-chunk", str(sweep_chunk)]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"engine": name, "failed": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - started
    lines = done.stdout.strip().splitlines()
    result_line = next((line for line in reversed(lines) if line.startswith("RESULT ")), None)
    for line in lines:
        if not line.startswith("RESULT "):
            print(f"  [{name}] {line}", file=sys.stderr)
    if done.returncode != 0 or result_line is None:
        tail = (done.stderr.strip() or done.stdout.strip())[-800:]
        return {"engine": name, "failed": f"exit {done.returncode}: {tail}"}
    result: dict[str, Any] = json.loads(result_line[len("RESULT ") :])
    result["process_seconds"] = wall
    return result


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(title: str, rows: list[dict[str, Any]], unit: str) -> None:
    print(f"\n{title}")
    header = (
        f"  {'engine':<16} {'version':<11} {'bars':>10} {'seconds':>8} {unit:>13} {'(cpu) ' + unit:>17} "
        f"{'fills':>6} {'final PnL':>10} {'load s':>6} {'peak RSS MB':>11}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for r in rows:
        if "skipped" in r or "failed" in r:
            why = r.get("skipped") or r.get("failed")
            print(f"  {r['engine']:<16} {'(skipped: ' if 'skipped' in r else '(FAILED: '}{why})")
            continue
        print(
            f"  {r['engine']:<16} {str(r.get('version', '?'))[:11]:<11} {r['bars']:>10,} {r['seconds']:>8.2f} "
            f"{fmt_rate(r['rate']):>13} {fmt_rate(r.get('cpu_rate')):>17} {fmt(r.get('fills'), ','):>6} "
            f"{fmt(r.get('pnl'), ',.0f'):>10} {fmt(r.get('load_seconds'), '.1f'):>6} "
            f"{fmt(r.get('peak_rss_mb'), ',.0f'):>11}"
        )


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float:
    return a[key] / b[key] if a.get(key) and b.get(key) else math.nan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--bars", type=int, default=1_000_000, help="at least this many bars (default 1,000,000)")
    parser.add_argument("--quick", action="store_true", help="at least 200,000 bars (5 copies)")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    parser.add_argument("--no-sweep", action="store_true", help="skip the parameter-sweep measurement")
    parser.add_argument("--sweep-chunk", type=int, default=25, help="sweep pairs per from_signals call")
    parser.add_argument("--timeout", type=float, default=900.0, help="per-engine timeout, seconds")
    parser.add_argument("--json", type=Path, help="also write all results to this JSON file")
    args = parser.parse_args(argv)

    wanted = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in wanted if e not in ENGINES]
    if unknown:
        parser.error(f"unknown engine(s): {', '.join(unknown)}")
    min_bars = 200_000 if args.quick else args.bars

    t0 = time.perf_counter()
    data = build_bars(min_bars)
    with np.load(data) as z:
        n_bars = len(z["ts"])
    print(
        f"EMA {10}/{50} crossover, long-only, 1 BTC, 0.1 % fee per side, fill at next bar's open; "
        f"{n_bars:,} 1-minute bars ({n_bars // SOURCE_BARS} x {SOURCE_BARS:,}) from {data.relative_to(ROOT)}; "
        f"host python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load_average()}"
    )

    peers_wanted = [e for e in wanted if ENGINES[e][1] == "peers"]
    peer_python, problems = ensure_bench_venv(peers_wanted) if peers_wanted else (None, {})
    pythons = {"meltica": meltica_python(), "peers": peer_python}

    def run(name: str, sweep: bool) -> dict[str, Any]:
        label = f"{name} sweep" if sweep else name
        if name in problems or pythons[ENGINES[name][1]] is None:
            return {"engine": label, "failed": f"not installed: {problems.get(name, 'no interpreter')}"}
        print(f"  running {label} …", file=sys.stderr, flush=True)
        python = pythons[ENGINES[name][1]]
        assert python is not None
        result = run_engine(python, name, data, sweep, args.sweep_chunk, args.timeout)
        result.setdefault("engine", label)
        work = result.get("evaluations") or result.get("bars")
        if work and result.get("seconds"):
            result["rate"] = work / result["seconds"]
        if work and result.get("cpu_seconds"):
            result["cpu_rate"] = work / result["cpu_seconds"]
        return result

    single = {name: run(name, sweep=False) for name in wanted}
    sweeps = {} if args.no_sweep else {name: run(name, sweep=True) for name in wanted if name in SWEEP_ENGINES}

    print_table("single run (event loop / one backtest)", list(single.values()), "bars/s")
    if sweeps:
        grid = "10 x 10 (fast 5..40, slow 50..140)"
        print_table(f"parameter sweep, {grid}; fills/PnL are the (10, 50) pair's", list(sweeps.values()), "bar-evals/s")

    ok = {k: v for k, v in single.items() if "rate" in v}
    ref = ok.get("reference")
    if ref is not None:
        print("\nagreement with the reference loop (same workload?):")
        for name, r in {**ok, **{f"{k} sweep": v for k, v in sweeps.items() if "rate" in v}}.items():
            if name == "reference" or r.get("fills") is None:
                continue
            d_fills, d_pnl = r["fills"] - ref["fills"], r["pnl"] - ref["pnl"]
            # Seeding and Nautilus's close-fill move a few trades / a fraction of a percent; more is a bug.
            off = abs(d_fills) > 0.005 * max(ref["fills"], 1) or abs(d_pnl) > 0.02 * max(abs(ref["pnl"]), 1.0)
            print(
                f"  {name:<16} fills {d_fills:+6d} ({r['fills']:,} vs {ref['fills']:,})   "
                f"PnL {d_pnl:+12,.0f} ({r['pnl']:,.0f} vs {ref['pnl']:,.0f})"
                + ("   <-- NOT the same workload" if off else "")
            )

    meltica = ok.get("meltica")
    if meltica is not None:
        print("\nMeltica / peer (bars per second; bars per CPU-second):")
        for peer in PEER_NAMES:
            if peer in ok:
                cpu = _ratio(meltica, ok[peer], "cpu_rate")
                print(f"  meltica / {peer:<11} {meltica['rate'] / ok[peer]['rate']:8.2f}x   cpu {cpu:8.2f}x")
        for peer, goal in (("backtrader", 10.0), ("nautilus", 3.0)):
            if peer in ok:
                x = _ratio(meltica, ok[peer], "cpu_rate")
                print(f"  target >= {goal:g}x {peer} per CPU-second: {'met' if x >= goal else 'NOT met'} ({x:.2f}x)")
    else:
        print("\nMeltica / peer ratios: not computed (meltica backtest engine not available yet)")
    msweep, vsweep = sweeps.get("meltica"), sweeps.get("vectorbt")
    if msweep is not None and vsweep is not None and "rate" in msweep and "rate" in vsweep:
        x, cpu = msweep["rate"] / vsweep["rate"], _ratio(msweep, vsweep, "cpu_rate")
        verdict = "met" if cpu > 1 else "NOT met"
        print(f"  meltica sweep / vectorbt sweep {x:.2f}x, cpu {cpu:.2f}x  (target ahead of vectorbt: {verdict})")
    if msweep is not None and msweep.get("engine_check"):
        for pair, c in msweep["engine_check"].items():
            same = "same" if c["equal"] else "DIFFERENT"
            print(f"  meltica sweep vs engine, pair {pair}: {same} (sweep {c['sweep']}, engine {c['engine']})")

    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s; load average now {load_average()}")
    print(
        "(bars/s = bars / wall seconds of the backtest loop; (cpu) = bars / CPU seconds of that process over the"
        " same loop, all threads — the steadier figure when other jobs share the machine)"
    )
    if args.json:
        args.json.write_text(json.dumps({"bars": n_bars, "single": single, "sweep": sweeps}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
