"""Window state survives kill -9 and rebalances: final summaries equal an uninterrupted reference.

Real broker, real daemon processes, SIGKILL at random points while a foreign producer streams
events. Every event must be in the windows exactly once: a lost event shows as a final ``total``
below the number sent, a replayed one as a ``total`` above it (at any time), and either would move
the window statistics away from the oracle computed from the events themselves.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from daemon_process import DaemonProcess
from kafka_tools import create_topics, produce_foreign, read_topic_foreign
from metricsd.devbroker import DevBroker

pytestmark = pytest.mark.integration

PARTITIONS = 6
WINDOW = 40
RUNS = 12
PER_RUN = 240


def daemon(broker: DevBroker, topic: str, log: Path) -> DaemonProcess:
    return DaemonProcess(
        ["--bootstrap-servers", broker.bootstrap, "--input-topic", topic,
         "--output-topic", f"{topic}.out", "--group-id", f"{topic}-group", "--interval", "0.5",
         "--window", str(WINDOW), "--time-window", "0", "--stats-interval", "1"],
        log,
    )  # fmt: skip


def events() -> dict[str, list[float]]:
    rng = np.random.default_rng(11)
    return {f"run-{r}": rng.lognormal(-2, 0.4, PER_RUN).round(6).tolist() for r in range(RUNS)}


def stream_in_background(broker: DevBroker, topic: str, values: dict[str, list[float]],
                         seconds: float) -> threading.Thread:  # fmt: skip
    """Produce every run's values in order, spread over ``seconds``, from a foreign client."""
    chunks = 24
    step = PER_RUN // chunks

    def produce() -> None:
        for c in range(chunks):
            batch = [
                (run.encode(), orjson.dumps({"type": "batch_time", "run_id": run, "seconds": v,
                                             "ts": 1_764_000_000.0 + c * step + i}), None)
                for run, vs in values.items()
                for i, v in enumerate(vs[c * step : (c + 1) * step])
            ]  # fmt: skip
            produce_foreign(broker.bootstrap, topic, batch)
            time.sleep(seconds / chunks)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    return thread


def published(line: dict[str, Any]) -> bool:
    """A stats line after this process published summaries (its tick wrote changelog state)."""
    return line.get("event") == "stats" and line.get("summaries", 0) > 0


def summaries(records: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    out = [orjson.loads(v) for _, v, _, _ in records]
    return [r for r in out if r.get("type") == "summary"]


def complete(records: list[tuple[Any, ...]]) -> bool:
    done = {r["run_id"] for r in summaries(records) if r["total"] >= PER_RUN}
    return len(done) == RUNS


def check_against_reference(records: list[tuple[Any, ...]], values: dict[str, list[float]]) -> None:
    """The newest summary of every run equals the uninterrupted reference; no total overshoots."""
    seen = summaries(records)
    overshoot = [r for r in seen if r["total"] > PER_RUN]
    assert not overshoot, f"events counted twice: {overshoot[:3]}"
    for run, vs in values.items():
        final = max((r for r in seen if r["run_id"] == run), key=lambda r: (r["total"], r["seq"]))
        window = np.array(vs[-WINDOW:])
        assert final["total"] == PER_RUN and final["count"] == WINDOW
        m = final["metrics"]
        assert m["mean"] == pytest.approx(window.mean(), rel=1e-9)
        assert m["std"] == pytest.approx(window.std(), rel=1e-9)
        assert m["p99"] == pytest.approx(np.percentile(window, 99), rel=1e-9)
        assert m["min"] == window.min() and m["max"] == window.max()


def test_kill_9_three_times_while_events_flow(broker: DevBroker, topic_name: str,
                                              tmp_path: Path) -> None:  # fmt: skip
    """Three SIGKILLs at random points, each followed by a restart: the windows resume from the
    changelog and the final summaries equal the reference."""
    topic = topic_name
    create_topics(broker.bootstrap, {topic: PARTITIONS})
    values = events()
    rnd = random.Random(5)
    current = daemon(broker, topic, tmp_path / "d0.log").start()
    current.wait_for_log(lambda line: line.get("event") == "partitions_assigned", timeout=60)
    producer = stream_in_background(broker, topic, values, seconds=12)
    restored_rows = []
    try:
        for kill in range(1, 4):
            time.sleep(rnd.uniform(1.5, 4.0))
            if kill == 1:
                # A random moment, but not before the first instance published (and so wrote
                # state), or no restart might have anything to restore on a loaded machine.
                # (Later instances may have nothing left to consume, hence nothing to publish.)
                current.wait_for_log(published, timeout=60)
            current.kill()
            current = daemon(broker, topic, tmp_path / f"d{kill}.log").start()
            line = current.wait_for_log(lambda ln: ln.get("event") == "state_restored", timeout=60)
            restored_rows.append(line["rows"])
        producer.join(60)
        out = read_topic_foreign(broker.bootstrap, f"{topic}.out", range(PARTITIONS),
                                 until=complete, timeout=90)  # fmt: skip
        assert current.terminate() == 0
    finally:
        current.kill()
    assert complete(out), f"not all runs complete; log:\n{current.tail()}"
    assert any(rows > 0 for rows in restored_rows), "no restart restored any state"
    check_against_reference(out, values)


def test_three_instances_one_killed_mid_stream(broker: DevBroker, topic_name: str,
                                               tmp_path: Path) -> None:  # fmt: skip
    """Three instances share the partitions; one is killed; its runs move with their partitions
    and keep their windows."""
    topic = topic_name
    create_topics(broker.bootstrap, {topic: PARTITIONS})
    values = events()
    instances = [daemon(broker, topic, tmp_path / f"i{i}.log").start() for i in range(3)]
    try:
        for inst in instances:
            inst.wait_for_log(lambda line: line.get("event") == "partitions_assigned", timeout=60)
        producer = stream_in_background(broker, topic, values, seconds=8)
        time.sleep(3.0)
        instances[0].wait_for_log(published, timeout=60)  # it has state worth moving
        instances[0].kill()
        producer.join(60)
        out = read_topic_foreign(broker.bootstrap, f"{topic}.out", range(PARTITIONS),
                                 until=complete, timeout=90)  # fmt: skip
        for inst in instances[1:]:
            assert inst.terminate() == 0
    finally:
        for inst in instances:
            inst.kill()
    assert complete(out), "\n".join(inst.tail(10) for inst in instances)
    moved = [line for inst in instances[1:] for line in inst.logs()
             if line.get("event") == "state_restored" and line["rows"] > 0]  # fmt: skip
    assert moved, "the survivors never restored the killed instance's runs"
    check_against_reference(out, values)
