"""Ranks on the real broker: 8 emitters of one run (ranks 0-7), rank 5 three times slower; the
daemon's ranks summary names rank 5, and only rank 5, as a straggler.

No mocks: Tansu, the daemon as a child process, eight Emitters with their own aiokafka
producers, confluent-kafka reading the output back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import orjson
import pytest
from daemon_process import daemon_on
from kafka_tools import create_topics, read_topic_foreign
from metricsd.devbroker import DevBroker
from metricsd.emitter import Emitter

pytestmark = pytest.mark.integration

RUN = "ranks-run"
RANKS = 8
STEPS = 200
SLOW = 5
SUMMARY_SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "schemas" / "summary.schema.json").read_text()
)


def latest_ranks(records: list[tuple[Any, ...]]) -> dict[str, Any] | None:
    best = None
    for _, value, _, _ in records:
        rec = orjson.loads(value)
        mine = rec["run_id"] == RUN and rec["stream"] == "ranks"
        if mine and (best is None or rec["seq"] > best["seq"]):
            best = rec
    return best


def test_eight_ranks_one_three_times_slower_is_the_one_straggler(
    broker: DevBroker, topic_name: str, tmp_path: Path
) -> None:
    """200 steps per rank through 8 Emitters (rank=0..7); once all 1,600 step times are in, the
    ranks summary has 8 ranks, per-rank medians equal to numpy's, and stragglers == [5]."""
    topic = topic_name
    create_topics(broker.bootstrap, {topic: 2})
    daemon = daemon_on(
        broker.bootstrap, topic, tmp_path / "daemon.log", "--window", str(STEPS), "--interval",
        "0.5", "--time-window", "0", partitions=2,
    )  # fmt: skip
    rng = np.random.default_rng(5)
    seconds = {r: rng.lognormal(-3.0, 0.1, STEPS) * (3 if r == SLOW else 1) for r in range(RANKS)}
    with daemon:
        daemon.wait_for_log(lambda ln: ln.get("event") == "partitions_assigned", 60)
        emitters = [
            Emitter(RUN, bootstrap_servers=broker.bootstrap, topic=topic, rank=r, linger=0.05,
                    heartbeat_interval=0)
            for r in range(RANKS)
        ]  # fmt: skip
        try:
            for step in range(STEPS):
                for r, em in enumerate(emitters):
                    em.batch_time(float(seconds[r][step]), step=step)
            for em in emitters:
                assert em.flush(timeout=30), f"not delivered: {em.stats()}"
            out = read_topic_foreign(
                broker.bootstrap,
                f"{topic}.out",
                range(2),
                until=lambda got: (latest_ranks(got) or {}).get("count") == RANKS * STEPS,
                timeout=30,
            )
        finally:
            for em in emitters:
                em.close(timeout=10)
    summary = latest_ranks(out)
    assert summary is not None and summary["count"] == RANKS * STEPS, daemon.tail()
    jsonschema.Draft202012Validator(SUMMARY_SCHEMA).validate(summary)
    m = summary["metrics"]
    assert m["ranks"] == RANKS and m["dropped"] == 0
    assert m["stragglers"] == [SLOW] and m["straggler_count"] == 1
    medians = {r: float(np.median(v)) for r, v in seconds.items()}
    assert {s["rank"]: s["median"] for s in m["slowest"]} == pytest.approx(medians, rel=1e-12)
    assert m["slowest"][0]["rank"] == SLOW
    assert all(s["z"] < m["threshold"] for s in m["slowest"][1:])
