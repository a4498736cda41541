"""The emitter on the real broker: a training loop reaches the daemon; a broker outage costs the
loop nothing and its drops reach the summaries; no broker costs nothing.

No mocks: Tansu, the daemon as a child process, the emitter's own aiokafka producer, and
confluent-kafka reading back (a foreign client); the outage is a TCP proxy in front of the broker
(``tcp_proxy.py``), cut and restored.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import orjson
import pytest
from daemon_process import daemon_on
from kafka_tools import create_topics, read_topic_foreign
from metricsd.devbroker import DevBroker, free_port
from metricsd.emitter import Emitter
from scipy import stats as sps
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

PARTITIONS = 4
STEPS = 2000
RUN = "emitter-run"
SUMMARY_SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "schemas" / "summary.schema.json").read_text()
)
SCALAR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "run_id", "name", "value"],
    "properties": {
        "type": {"const": "scalar"},
        "run_id": {"type": "string", "minLength": 1, "maxLength": 256},
        "name": {"type": "string", "minLength": 1},
        "value": {
            "oneOf": [
                {"type": "number"},
                {"type": "array", "minItems": 1, "items": {"type": "number"}},
            ]
        },
        "step": {"type": "integer", "minimum": 0},
        "ts": {"type": "number", "minimum": 0},
        "rank": {"type": "integer", "minimum": 0},
    },
}


def latest(records: list[tuple[Any, ...]], stream: str, run: str = RUN) -> dict[str, Any] | None:
    """The newest count-window summary of ``run``'s ``stream`` (highest seq)."""
    best = None
    for _, value, _, _ in records:
        rec = orjson.loads(value)
        if (
            rec["type"] == "summary"
            and rec["run_id"] == run
            and rec["stream"] == stream
            and rec["window"]["kind"] == "count"
            and (best is None or rec["seq"] > best["seq"])
        ):
            best = rec
    return best


def latest_batch_time(records: list[tuple[Any, ...]]) -> dict[str, Any] | None:
    return latest(records, "batch_time")


def assert_numeric_summary(summary: dict[str, Any], values: list[float]) -> None:
    """The summary's statistics equal numpy/scipy on ``values`` (to 1e-9 relative)."""
    window = np.array(values)
    m = summary["metrics"]
    assert summary["count"] == len(values)
    assert m["mean"] == pytest.approx(window.mean(), rel=1e-9)
    assert m["std"] == pytest.approx(window.std(), rel=1e-9)
    assert m["median"] == pytest.approx(np.median(window), rel=1e-9)
    assert m["p99"] == pytest.approx(np.percentile(window, 99), rel=1e-9)
    assert m["min"] == window.min() and m["max"] == window.max()
    assert m["skewness"] == pytest.approx(sps.skew(window), rel=1e-9)


def values_of(records: list[tuple[Any, ...]], name: str) -> list[float]:
    out: list[float] = []
    for _, value, _, _ in records:
        doc = orjson.loads(value)
        if doc["type"] == "scalar" and doc["name"] == name:
            out.extend(doc["value"] if isinstance(doc["value"], list) else [doc["value"]])
    return out


def test_a_training_loop_through_the_emitter_reaches_the_daemon(
    broker: DevBroker, topic_name: str, tmp_path: Path
) -> None:
    """2,000 steps of batch_time + 3 scalars: the daemon's batch_time, scalar/loss and
    scalar/grad_norm summaries equal numpy/scipy on the loop's values, emitter/dropped says 0;
    the scalars are on the input topic in the issue's format, coalesced into few records, all on
    the run's one partition."""
    topic = topic_name
    create_topics(broker.bootstrap, {topic: PARTITIONS})
    daemon = daemon_on(
        broker.bootstrap, topic, tmp_path / "daemon.log", "--window", str(STEPS), "--interval",
        "1", "--time-window", "0", partitions=PARTITIONS,
    )  # fmt: skip
    rng = np.random.default_rng(11)
    seconds: list[float] = []
    losses: list[float] = []
    with daemon:
        em = Emitter(RUN, bootstrap_servers=broker.bootstrap, topic=topic, rank=0, linger=0.2)
        for step in range(STEPS):
            s = float(rng.lognormal(-3.0, 0.4))
            loss = float(np.exp(-step / 500) + rng.normal(0, 0.01))
            seconds.append(s)
            losses.append(loss)
            em.batch_time(s, step=step)
            em.scalars({"loss": loss, "lr": 1e-3, "grad_norm": 2 * s}, step=step)
            if step % 200 == 0:
                time.sleep(0.05)  # a loop that takes time, so that several batches go out
        assert em.close(timeout=60), f"not delivered: {em.stats()}"
        stats = em.stats()
        assert stats["sent"] == stats["enqueued"] == 4 * STEPS + 1  # + run_end
        assert stats["dropped"] == stats["delivery_errors"] == 0

        out = read_topic_foreign(
            broker.bootstrap,
            f"{topic}.out",
            range(PARTITIONS),
            until=lambda got: all(
                (latest(got, stream) or {}).get("final")
                for stream in ("batch_time", "scalar/loss", "scalar/grad_norm")
            ),
            timeout=60,
        )
        summary = latest_batch_time(out)
        assert summary is not None and summary["total"] == STEPS, daemon.tail()
        validator = jsonschema.Draft202012Validator(SUMMARY_SCHEMA)
        validator.validate(summary)
        assert_numeric_summary(summary, seconds)
        for name, values in (("loss", losses), ("grad_norm", [2 * s for s in seconds])):
            scalar = latest(out, f"scalar/{name}")
            assert scalar is not None and scalar["total"] == STEPS, daemon.tail()
            validator.validate(scalar)
            assert_numeric_summary(scalar, values)
            assert scalar["metrics"]["non_finite"] == 0
        dropped = latest(out, "scalar/emitter/dropped")
        assert dropped is not None and dropped["final"], daemon.tail()
        assert dropped["metrics"]["max"] == 0  # the summaries say the run's data is complete
        assert daemon.terminate() == 0

    inputs = read_topic_foreign(
        broker.bootstrap,
        topic,
        range(PARTITIONS),
        until=lambda got: len(values_of(got, "grad_norm")) >= STEPS,
        timeout=30,
    )
    assert values_of(inputs, "loss") == losses
    assert values_of(inputs, "grad_norm") == [2 * s for s in seconds]
    assert {partition for _, _, partition, _ in inputs} == {inputs[0][2]}  # one partition
    assert all(key == RUN.encode() for key, _, _, _ in inputs)
    docs = [orjson.loads(value) for _, value, _, _ in inputs]
    scalars = [d for d in docs if d["type"] == "scalar"]
    validator = jsonschema.Draft202012Validator(SCALAR_SCHEMA)
    for doc in scalars:
        validator.validate(doc)
        assert doc["rank"] == 0
    assert [d["name"] for d in scalars][-1] == "emitter/dropped"
    assert scalars[-1]["value"] == 0
    assert docs[-1]["type"] == "run_end" and docs[-1]["status"] == "completed"
    batch_records = [d for d in docs if d["type"] == "batch_time"]
    assert len(batch_records) < STEPS / 20, f"{len(batch_records)} batch_time records"
    offsets = [offset for _, _, _, offset in inputs]
    assert offsets == sorted(offsets)  # one partition, read in order = sent in order


def test_with_no_broker_calls_return_fast_and_drops_are_counted() -> None:
    """Against a port where nothing listens: 8,000 calls stay in the microseconds, the queue keeps
    the newest 500, every other call is counted as dropped, and close gives up on time."""
    em = Emitter(
        "no-broker", bootstrap_servers=f"127.0.0.1:{free_port()}", queue_size=500, linger=0.05
    )
    durations = []
    clock = time.perf_counter_ns
    for step in range(STEPS):
        t0 = clock()
        em.batch_time(0.001, step=step)
        em.scalars({"loss": 1.0, "lr": 1e-3, "grad_norm": 0.5}, step=step)
        durations.append(clock() - t0)
        if step % 500 == 0:
            time.sleep(0.1)  # let the thread try (and fail) to connect meanwhile
    stats = em.stats()
    assert stats["connect_errors"] >= 1 and not stats["connected"]
    assert stats["sent"] == 0 and stats["queue_depth"] == 500
    assert stats["dropped"] == 4 * STEPS - 500
    median_us = statistics.median(durations) / 1000
    assert median_us < 100, f"median of 4 calls {median_us:.1f} µs with the broker down"
    start = time.monotonic()
    assert em.close(timeout=1.0) is False
    assert time.monotonic() - start < 5
    assert em.stats()["dropped"] == 4 * STEPS + 1  # everything, run_end included


def spin(seconds: float) -> None:
    """``seconds`` of CPU holding the GIL, like Python training code."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_broker_cut_mid_run_costs_the_loop_nothing_and_the_drops_reach_the_summaries(
    tmp_path: Path,
) -> None:
    """A training loop of 1 ms steps (batch_time + 3 scalars each) keeps going while every
    connection to the broker is cut for 3 s: its median step time stays that of the steps before
    the cut (within 10%), the emitter's queue (2,000 calls, 0.5 s of them) overflows and counts
    what it dropped, and once the broker is back the daemon's summary of the run's
    ``emitter/dropped`` scalar reports that count (its max, in the final summary), while
    batch_time's total shows the steps missing."""
    proxy_port = free_port()
    broker = DevBroker(advertised=f"127.0.0.1:{proxy_port}", log_path=tmp_path / "tansu.log")
    broker.start()
    proxy = TcpProxy(broker.bootstrap, port=proxy_port).start()
    topic, run = "emitter-outage", "outage-run"
    daemon = daemon_on(
        proxy.address, topic, tmp_path / "daemon.log", "--interval", "0.5", "--time-window", "0",
        partitions=1,
    )  # fmt: skip
    phases: dict[str, list[float]] = {"before": [], "cut": [], "after": []}
    step = 0

    def train(phase: str, seconds: float, em: Emitter) -> None:
        nonlocal step
        clock = time.perf_counter
        end = clock() + seconds
        last = 0.001
        while clock() < end:
            t0 = clock()
            spin(0.001)
            em.batch_time(last, step=step)
            em.scalars({"loss": 1.0 / (step + 1), "lr": 1e-3, "grad_norm": 0.5}, step=step)
            last = clock() - t0
            phases[phase].append(last)
            step += 1

    try:
        create_topics(proxy.address, {topic: 1})
        with daemon:
            daemon.wait_for_log(lambda line: line.get("event") == "partitions_assigned", timeout=60)
            em = Emitter(
                run, bootstrap_servers=proxy.address, topic=topic, queue_size=2000, linger=0.1,
                heartbeat_interval=0.5, producer_options={"request_timeout_ms": 30_000},
            )  # fmt: skip
            em.scalar("warmup", 0.0)
            assert em.flush(30), em.stats()
            train("before", 1.5, em)
            assert em.stats()["dropped"] == 0
            proxy.cut()
            train("cut", 3.0, em)
            during = em.stats()
            proxy.restore()
            train("after", 1.5, em)
            assert em.close(timeout=60), f"not delivered after the broker returned: {em.stats()}"
            stats = em.stats()
            lost = stats["dropped"] + stats["delivery_errors"]
            out = read_topic_foreign(
                proxy.address, f"{topic}.out", [0],
                until=lambda got: bool((latest(got, "scalar/emitter/dropped", run) or {}).get(
                    "final")),
                timeout=90,
            )  # fmt: skip
            assert daemon.terminate() == 0
    finally:
        proxy.stop()
        broker.stop()

    median = {phase: statistics.median(times) for phase, times in phases.items()}
    assert median["cut"] <= 1.10 * median["before"], median
    assert median["after"] <= 1.10 * median["before"], median
    assert during["dropped"] > 0 and not during["sent"] > stats["sent"]
    assert lost >= during["dropped"] > 0, stats
    assert stats["enqueued"] == stats["sent"] + lost, stats
    assert stats["queue_depth"] == stats["in_flight"] == 0
    dropped = latest(out, "scalar/emitter/dropped", run)
    assert dropped is not None and dropped["final"]
    assert dropped["metrics"]["max"] == lost, (dropped["metrics"], stats)
    assert dropped["metrics"]["min"] == 0  # the heartbeats before the cut
    batch = latest(out, "batch_time", run)
    assert batch is not None and batch["final"]
    assert batch["total"] < step  # the dropped step times are missing, and the summary says so
