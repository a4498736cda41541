"""End-to-end latency: an event produced → the first summary that covers it, read back.

Definition
----------
For the k-th batch_time event sent for run r (k = 1, 2, ...), its latency is the time from just
before ``producer.send`` is called for it to the moment a consumer of the output topic has in hand
the first ``summary`` record of (r, ``batch_time``) whose ``total`` is at least k (any window:
all windows of one tick carry the same ``total``). Both instants are read from the same
``perf_counter`` in the bench process. Per repetition: p50, p99 and max over every event sent.

Setup
-----
A fresh embedded broker; per repetition fresh topics and a fresh group; the daemon as a real child
process (``python -m metricsd.cli run --interval <interval>``, every other flag at its default,
time windows included), started and given its partitions (its ``partitions_assigned`` log line)
before the first event is sent. The bench process runs the load (an aiokafka producer with
``linger_ms=0``, ``acks=1``, events spread evenly over ``runs`` runs at ``rate`` events/s, sent
every 5 ms) and the reader (aiokafka, ``assign()`` of every output partition, no group,
``fetch_max_wait_ms=10`` so the reader's own long-poll adds at most 10 ms). After ``seconds`` of
load it waits up to 10 s for the remaining events to be covered, then stops the daemon with SIGTERM.

What it shows: an event waits for the next tick (uniform over one interval, so p50 ≈ interval/2,
p99 ≈ interval), then the tick's statistics, publish (``acks=all``), and the reader's fetch. The
target is p99 ≤ interval + 100 ms.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from metricsd.devbroker import DevBroker
from numpy.typing import NDArray

from bench.common import REPO, Figure, Sizes, create_topics

__all__ = ["Latencies", "run"]

_SEND_EVERY_S = 0.005
_DRAIN_S = 10.0
_READY_TIMEOUT_S = 60.0


@dataclass(slots=True)
class Latencies:
    """Send times per run, and (read time, total) of every covering summary seen per run."""

    sent: dict[str, list[float]] = field(default_factory=dict)
    sent_wall: dict[str, list[float]] = field(default_factory=dict)  # time.time() at send
    # per run: (read at, total, emitted_at, read at in time.time())
    seen: dict[str, list[tuple[float, int, float, float]]] = field(default_factory=dict)

    def covered(self) -> bool:
        for run, times in self.sent.items():
            seen = self.seen.get(run)
            if not seen or max(item[1] for item in seen) < len(times):
                return False
        return True

    def seconds(self) -> tuple[dict[str, NDArray[np.float64]], int]:
        """Per covered event: ``total`` latency, ``to_tick`` (send → the covering summary's
        ``emitted_at``, i.e. waiting for a tick) and ``from_tick`` (``emitted_at`` → read back:
        statistics, publish, acknowledgement, fetch), in seconds; and the events never covered.
        The two parts use the wall clock (``time.time()``, shared by both processes)."""
        parts: dict[str, list[NDArray[np.float64]]] = {"total": [], "to_tick": [], "from_tick": []}
        uncovered = 0
        for run, times in self.sent.items():
            sends = np.asarray(times)
            sends_wall = np.asarray(self.sent_wall[run])
            seen = sorted(self.seen.get(run, []))
            if not seen:
                uncovered += len(times)
                continue
            read_at, totals, emitted, read_wall = (np.array(col) for col in zip(*seen, strict=True))
            reach = np.maximum.accumulate(totals)
            first = np.searchsorted(reach, np.arange(1, len(times) + 1), side="left")
            ok = first < len(seen)
            uncovered += int((~ok).sum())
            hit = first[ok]
            parts["total"].append(read_at[hit] - sends[ok])
            parts["to_tick"].append(emitted[hit] - sends_wall[ok])
            parts["from_tick"].append(read_wall[hit] - emitted[hit])
        return {k: np.concatenate(v) if v else np.empty(0) for k, v in parts.items()}, uncovered


class _Daemon:
    """``python -m metricsd.cli run`` as a child process, JSON logs in a file, stopped by PID."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("METRICSD_")}
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "metricsd.cli", "run", "--log-format", "json", *args],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=REPO,
                start_new_session=True,
            )

    async def ready(self, timeout: float) -> None:
        """Wait for the ``partitions_assigned`` log line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"daemon exited with {self.proc.returncode}: "
                    f"{self.log_path.read_text()[-2000:]}"
                )
            if b'"partitions_assigned"' in self.log_path.read_bytes():
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"daemon not assigned within {timeout} s; log: {self.log_path}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _produce(
    bootstrap: str, topic: str, sizes: Sizes, partitions: int, lat: Latencies
) -> None:
    runs = [f"lat-r{i}" for i in range(sizes.latency_runs)]
    keys = [r.encode() for r in runs]
    for run in runs:
        lat.sent[run] = []
        lat.sent_wall[run] = []
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=0)
    await producer.start()
    try:
        clock = time.perf_counter
        start = clock()
        sent = 0
        rng = np.random.default_rng(6)
        while (elapsed := clock() - start) < sizes.latency_seconds:
            due = int(elapsed * sizes.latency_rate) - sent
            for _ in range(due):
                i = sent % len(runs)
                value = (
                    b'{"type":"batch_time","run_id":"%s","ts":%.6f,"step":%d,"seconds":%.6f}'
                    % (
                        keys[i],
                        time.time(),
                        sent // len(runs),
                        rng.lognormal(-1.9, 0.2),
                    )
                )
                lat.sent_wall[runs[i]].append(time.time())
                lat.sent[runs[i]].append(clock())
                await producer.send(topic, value, key=keys[i], partition=i % partitions)
                sent += 1
            await asyncio.sleep(_SEND_EVERY_S)
        await producer.flush()
    finally:
        await producer.stop()


async def _read(
    bootstrap: str, topic: str, partitions: int, lat: Latencies, stop: asyncio.Event
) -> None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        await consumer.seek_to_beginning()
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=20)
            now, wall = time.perf_counter(), time.time()
            for records in batch.values():
                for record in records:
                    rec = orjson.loads(record.value)
                    if rec.get("type") == "summary" and rec["stream"] == "batch_time":
                        lat.seen.setdefault(rec["run_id"], []).append(
                            (now, rec["total"], rec["emitted_at"], wall)
                        )
    finally:
        await consumer.stop()


async def _repetition(bootstrap: str, sizes: Sizes, rep: int, workdir: Path) -> Latencies:
    partitions = 8
    topic_in, topic_out = f"bench.lat.{rep}", f"bench.lat.{rep}.out"
    await create_topics(bootstrap, {topic_in: partitions, topic_out: partitions})
    daemon = _Daemon(
        [
            "--bootstrap-servers",
            bootstrap,
            "--input-topic",
            topic_in,
            "--output-topic",
            topic_out,
            "--group-id",
            f"bench-lat-{rep}",
            "--interval",
            f"{sizes.latency_interval:g}",
            "--partitions",
            str(partitions),
            "--http-port",  # no HTTP server: the default port may be taken by another daemon
            "0",
        ],
        workdir / f"daemon-{rep}.log",
    )
    lat = Latencies()
    stop = asyncio.Event()
    try:
        await daemon.ready(_READY_TIMEOUT_S)
        reader = asyncio.create_task(_read(bootstrap, topic_out, partitions, lat, stop))
        await _produce(bootstrap, topic_in, sizes, partitions, lat)
        deadline = time.monotonic() + _DRAIN_S
        while not lat.covered() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await reader
    finally:
        daemon.stop()
    return lat


def run(sizes: Sizes, log: Callable[[str], None]) -> list[Figure]:
    """p50/p99/max latency per repetition, each a fresh daemon process on a fresh topic."""
    label = (
        f"{sizes.latency_rate:,.0f} events/s, {sizes.latency_runs} runs, "
        f"interval {sizes.latency_interval:g} s"
    )
    p50 = Figure("latency", f"p50, {label}", "ms")
    p99 = Figure("latency", f"p99, {label}", "ms", note=f"{sizes.latency_seconds:g} s of load")
    worst = Figure("latency", f"max, {label}", "ms")
    to_tick = {q: Figure("latency", f"{q}, send → tick (emitted_at)", "ms") for q in ("p50", "p99")}
    from_tick = {
        q: Figure("latency", f"{q}, tick (emitted_at) → read back", "ms") for q in ("p50", "p99")
    }
    events = Figure("latency", "events measured per repetition", "", digits=6)
    missing = Figure("latency", "events never covered", "", digits=6)
    with DevBroker() as broker, tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        for rep in range(sizes.repeat):
            lat = asyncio.run(_repetition(broker.bootstrap, sizes, rep, Path(tmp)))
            parts, uncovered = lat.seconds()
            total = parts["total"]
            if total.size:
                q50, q99 = np.percentile(total, (50, 99))
                p50.samples.append(1e3 * float(q50))
                p99.samples.append(1e3 * float(q99))
                worst.samples.append(1e3 * float(total.max()))
                for figs, key in ((to_tick, "to_tick"), (from_tick, "from_tick")):
                    a, b = np.percentile(parts[key], (50, 99))
                    figs["p50"].samples.append(1e3 * float(a))
                    figs["p99"].samples.append(1e3 * float(b))
            events.samples.append(float(total.size))
            missing.samples.append(float(uncovered))
            log(f"latency: repetition {rep + 1}/{sizes.repeat} done")
    return [p50, p99, worst, *to_tick.values(), *from_tick.values(), events, missing]
