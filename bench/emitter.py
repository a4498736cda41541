"""The training-side client's cost: ``python -m bench.emitter [--quick] [--repeat N]``.

Definition
----------
**Call cost**: the time one call takes on the caller's thread, ``perf_counter_ns`` around each
call (the timer's own cost, measured the same way around nothing, is reported apart), median and
p99 over many calls: ``scalar("loss", x, step)`` and ``predictions`` of 1,000 binary pairs (two
int64 NumPy arrays: validation plus the one copy). The emitter sends to a sender that discards
(no broker: the call's cost does not depend on it, and the background thread still runs, takes,
coalesces and serialises, competing for the GIL as it would).

**Step-time inflation**: a synthetic training step of 1 ms of CPU (a busy loop on
``perf_counter``, holding the GIL like Python training code), which also emits ``batch_time`` of
the previous step and 3 scalars; its wall time per step (the step plus the calls plus whatever the
background thread takes from it) in three modes run back to back, alternating their order: **no
emitter**, **broker up** (the embedded Tansu broker), **broker down** (a port where nothing
listens: the thread retries the connection and the queue drops). Per repetition: the mean step time
of each mode and the inflation ``mean(mode) / mean(no emitter) - 1``; the figures are the medians
over repetitions.

**Coalescing**: records that reached the broker per 1,000 steps with the broker up; at 1 ms steps
that is records per second per run, against the 4,000 calls per second the loop made.

Registered in ``bench.run`` as ``emitter``; its targets (scalar call median ≤ 2 µs and p99 ≤ 20 µs,
inflation ≤ 1% with the broker up and down) are checked there.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bench.common import Figure, Sizes, create_topics

__all__ = ["main", "run"]


class _NullSender:
    async def start(self) -> None:
        pass

    async def send(self, records: Sequence[tuple[bytes, bytes]]) -> list[BaseException | None]:
        return [None] * len(records)

    async def stop(self) -> None:
        pass


def _quantiles(ns: list[int]) -> tuple[float, float]:
    a = np.array(ns, dtype=np.float64)
    return float(np.median(a)), float(np.percentile(a, 99))


def _call_costs(calls: int, pred_calls: int) -> dict[str, tuple[float, float]]:
    from metricsd.emitter import Emitter

    clock = time.perf_counter_ns
    em = Emitter("bench-calls", sender=_NullSender(), queue_size=1_000_000, heartbeat_interval=0)
    out: dict[str, tuple[float, float]] = {}
    empty = []
    for _ in range(calls):
        t0 = clock()
        t1 = clock()
        empty.append(t1 - t0)
    out["timer"] = _quantiles(empty)
    scalar = []
    for i in range(calls):
        x = 1.0 / (i + 1)
        t0 = clock()
        em.scalar("loss", x, i)
        t1 = clock()
        scalar.append(t1 - t0)
    out["scalar"] = _quantiles(scalar)
    batch = []
    for i in range(calls):
        t0 = clock()
        em.batch_time(0.001, i)
        t1 = clock()
        batch.append(t1 - t0)
    out["batch_time"] = _quantiles(batch)
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, 1000)
    y_pred = rng.integers(0, 2, 1000)
    pred = []
    for _ in range(pred_calls):
        t0 = clock()
        em.predictions(y_true, y_pred, task="binary")
        t1 = clock()
        pred.append(t1 - t0)
    out["prediction"] = _quantiles(pred)
    em.close(timeout=30)
    return out


def _spin(seconds: float) -> None:
    clock = time.perf_counter
    end = clock() + seconds
    while clock() < end:
        pass


def _steps(em: Any, steps: int, work: float) -> float:
    """Mean wall seconds of one step of ``work`` s of CPU plus batch_time + 3 scalars."""
    clock = time.perf_counter
    last = work
    start = clock()
    for step in range(steps):
        t0 = clock()
        _spin(work)
        if em is not None:
            em.batch_time(last, step)
            em.scalars({"loss": 1.0 / (step + 1), "lr": 1e-3, "grad_norm": last * 1e3}, step)
        last = clock() - t0
    return (clock() - start) / steps


def run(sizes: Sizes, log: Callable[[str], None]) -> list[Figure]:
    from metricsd.devbroker import DevBroker, free_port
    from metricsd.emitter import Emitter

    calls = 20_000 if sizes.quick else 100_000
    pred_calls = 2_000 if sizes.quick else 10_000
    steps = 500 if sizes.quick else 3_000
    figures: dict[str, Figure] = {}

    def fig(name: str, unit: str, note: str = "") -> Figure:
        if name not in figures:
            figures[name] = Figure("emitter", name, unit, note=note)
        return figures[name]

    for rep in range(sizes.repeat):
        log(f"emitter: call costs, repetition {rep + 1}/{sizes.repeat}")
        for what, (median, p99) in _call_costs(calls, pred_calls).items():
            label = {
                "timer": "perf_counter_ns pair (timer overhead, included below)",
                "scalar": "scalar() call",
                "batch_time": "batch_time() call",
                "prediction": "predictions() call, 1,000 binary pairs",
            }[what]
            fig(f"{label}, median", "ns").samples.append(median)
            fig(f"{label}, p99", "ns").samples.append(p99)

    with DevBroker() as broker:
        topic = f"bench-emitter-{uuid.uuid4().hex[:8]}"
        asyncio.run(create_topics(broker.bootstrap, {topic: sizes.partitions}))
        down = f"127.0.0.1:{free_port()}"
        modes = ["none", "up", "down"]
        for rep in range(sizes.repeat):
            order = modes if rep % 2 == 0 else modes[::-1]
            means: dict[str, float] = {}
            for mode in order:
                log(f"emitter: 1 ms steps, broker {mode}, repetition {rep + 1}/{sizes.repeat}")
                em = None
                if mode != "none":
                    em = Emitter(
                        f"bench-{mode}-{rep}",
                        bootstrap_servers=broker.bootstrap if mode == "up" else down,
                        topic=topic,
                        queue_size=10_000,
                    )
                    if mode == "up":
                        em.scalar("warmup", 0.0)
                        em.flush(30)  # connected before the clock starts
                    else:
                        time.sleep(0.3)  # the first connection attempt has failed
                means[mode] = _steps(em, steps, 0.001)
                if em is not None:
                    em.close(timeout=10 if mode == "up" else 0.5)
                    stats = em.stats()
                    if mode == "up":
                        fig("records sent per 1,000 steps (broker up)", "").samples.append(
                            1000 * stats["records_sent"] / steps
                        )
                        fig("calls sent (broker up)", "%").samples.append(
                            100 * stats["sent"] / max(stats["enqueued"], 1)
                        )
                    else:
                        fig("calls dropped (broker down)", "%").samples.append(
                            100 * stats["dropped"] / max(stats["enqueued"], 1)
                        )
            for mode, name in (
                ("none", "no emitter"),
                ("up", "broker up"),
                ("down", "broker down"),
            ):
                fig(f"1 ms step + batch_time + 3 scalars, {name}", "µs").samples.append(
                    means[mode] * 1e6
                )
            for mode in ("up", "down"):
                fig(f"step-time inflation, broker {mode}", "%").samples.append(
                    100 * (means[mode] / means["none"] - 1)
                )
    return list(figures.values())


def render(figures: Sequence[Figure]) -> str:
    lines = ["| figure | median | min | max | n |", "|---|---:|---:|---:|---:|"]
    for f in figures:
        lines.append(
            f"| {f.name} | {f.median:,.4g} {f.unit} | {f.min:,.4g} | {f.max:,.4g} | "
            f"{len(f.samples)} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.emitter", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions (default 3)")
    args = parser.parse_args(argv)
    sizes = Sizes.tiny(args.repeat or 1) if args.quick else Sizes.full(args.repeat or 3)
    figures = run(sizes, lambda line: print(line, file=sys.stderr, flush=True))
    print(render(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
