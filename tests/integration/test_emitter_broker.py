"""The emitter on the real broker: a training loop reaches the daemon; no broker costs nothing.

No mocks: Tansu, the daemon as a child process, the emitter's own aiokafka producer, and
confluent-kafka reading back (a foreign client). The daemon does not know ``scalar`` yet (it
dead-letters it), so scalars are checked on the input topic, against the issue's format.
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


def latest_batch_time(records: list[tuple[Any, ...]]) -> dict[str, Any] | None:
    best = None
    for _, value, _, _ in records:
        rec = orjson.loads(value)
        if (
            rec["type"] == "summary"
            and rec["run_id"] == RUN
            and rec["stream"] == "batch_time"
            and rec["window"]["kind"] == "count"
            and (best is None or rec["seq"] > best["seq"])
        ):
            best = rec
    return best


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
    """2,000 steps of batch_time + 3 scalars: the daemon's batch_time summary equals numpy on
    the loop's values; the scalars are on the input topic in the issue's format, coalesced into
    few records, all on the run's one partition."""
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
            until=lambda got: (latest_batch_time(got) or {}).get("total", 0) >= STEPS,
            timeout=60,
        )
        summary = latest_batch_time(out)
        assert summary is not None and summary["total"] == STEPS, daemon.tail()
        jsonschema.Draft202012Validator(SUMMARY_SCHEMA).validate(summary)
        window = np.array(seconds)
        m = summary["metrics"]
        assert summary["count"] == STEPS
        assert m["mean"] == pytest.approx(window.mean(), rel=1e-9)
        assert m["std"] == pytest.approx(window.std(), rel=1e-9)
        assert m["median"] == pytest.approx(np.median(window), rel=1e-9)
        assert m["p99"] == pytest.approx(np.percentile(window, 99), rel=1e-9)
        assert m["skewness"] == pytest.approx(sps.skew(window), rel=1e-9)
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
