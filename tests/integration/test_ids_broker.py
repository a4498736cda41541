"""Summary ids on the real broker: two daemons of different groups write one output topic while
their runs end, are evicted and come back; no id is ever given to two contents."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from metricsd.devbroker import DevBroker

from tests.integration.daemon_process import daemon_on
from tests.integration.kafka_tools import create_topics, produce_foreign, read_topic_aiokafka

pytestmark = pytest.mark.integration

PARTITIONS = 2
RUNS = 12  # cycling through --max-runs 4: most runs are evicted and come back


Record = tuple[bytes | None, bytes, int | None]


def _rounds() -> list[list[Record]]:
    """Three rounds over RUNS runs (step times and a scalar), a run_end for every third run in
    the first round; each run on a fixed partition. Rounds are consumed one after the other, so
    a round's runs evict the previous round's (more than --max-runs per partition)."""
    rounds: list[list[Record]] = []
    for round_ in range(3):
        out: list[Record] = []
        rounds.append(out)
        for i in range(RUNS):
            run = f"r{i}"
            key, p = run.encode(), i % PARTITIONS
            value = 0.1 * (i + 1) + round_
            out.append(
                (key, orjson.dumps({"type": "batch_time", "run_id": run, "seconds": value}), p)
            )
            out.append(
                (
                    key,
                    orjson.dumps({"type": "scalar", "run_id": run, "name": "loss", "value": value}),
                    p,
                )
            )
            if round_ == 0 and i % 3 == 0:
                out.append((key, orjson.dumps({"type": "run_end", "run_id": run}), p))
    return rounds


def test_two_groups_on_one_output_topic_never_collide_and_returning_runs_get_new_ids(
    broker: DevBroker, topic_name: str, tmp_path: Path
) -> None:
    """Both daemons summarise the same input into one output topic: their ids are disjoint
    (group in the id), every id carries one content, and runs that ended or were evicted come
    back under a new incarnation instead of re-using seq 0."""
    topic = topic_name
    create_topics(broker.bootstrap, {topic: PARTITIONS})
    rounds = _rounds()
    flags = ("--max-runs", "4", "--interval", "0.3", "--stats-interval", "0.3")
    daemons = [
        daemon_on(
            broker.bootstrap,
            topic,
            tmp_path / f"{group}.log",
            *flags,
            "--group-id",
            group,
            partitions=PARTITIONS,
        )
        for group in (f"{topic}-a", f"{topic}-b")
    ]
    for daemon in daemons:
        daemon.start()
    try:
        for daemon in daemons:  # the two joins overlap: one group join of waiting in all
            daemon.wait_for_log(lambda line: line.get("event") == "partitions_assigned", 60)
        sent = 0
        for records in rounds:
            produce_foreign(broker.bootstrap, topic, records)
            sent += len(records)
            for daemon in daemons:
                daemon.wait_for_log(
                    lambda line, n=sent: line.get("event") == "stats" and line.get("events") == n,
                    30,
                )
        for daemon in daemons:
            assert daemon.terminate() == 0
        published = sum(
            next(line for line in d.logs() if line.get("event") == "stopped")["summaries"]
            for d in daemons
        )
    finally:
        for daemon in daemons:
            daemon.kill()
    out = read_topic_aiokafka(
        broker.bootstrap,
        f"{topic}.out",
        list(range(PARTITIONS)),
        until=lambda got: sum(b'"summary"' in (v or b"") for _, v, _, _ in got) >= published,
    )
    summaries = [orjson.loads(v) for _, v, _, _ in out if v and b'"summary"' in v]
    assert len(summaries) == published
    contents: dict[str, bytes] = {}
    for s in summaries:
        content = orjson.dumps({k: v for k, v in s.items() if k != "emitted_at"})
        assert contents.setdefault(s["id"], content) == content, s["id"]
    by_group = {
        g: {s["id"] for s in summaries if s["group"] == g} for g in (f"{topic}-a", f"{topic}-b")
    }
    assert all(by_group.values()) and not by_group[f"{topic}-a"] & by_group[f"{topic}-b"]
    # Per group: every run came back at least once (run_end, or evicted by --max-runs 4).
    for group in by_group:
        lives: dict[str, set[str]] = {}
        for s in summaries:
            if s["group"] == group and s["stream"] == "batch_time":
                lives.setdefault(s["run_id"], set()).add(s["incarnation"])
        assert len(lives) == RUNS and all(len(v) >= 2 for v in lives.values()), lives
