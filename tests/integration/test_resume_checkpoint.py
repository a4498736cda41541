"""After a restore, the first records ingested for a partition start at the changelog checkpoint,
never before it, whatever the committed offset (issue: a restart after many ticks of held-back
commits consumed from the commit again; a run evicted in between came back as a ghost).

How the commit is held back, deterministically and on the real broker: Tansu is started with a
schema registry whose JSON Schema for the output topic refuses the summaries of one run
("blocked"). Every tick then fails to publish that run's summary (a retriable failure for the
daemon, so the commit waits), while the changelog records, on another topic, are acknowledged and
the checkpoint moves on with every tick. The instance is stopped with SIGTERM, a second one
restores, and the totals of a live run, an ended run and an evicted run, each with events before
and after the restart, must count every event exactly once. (Tansu refuses the whole batch the
refused record is in, so the other runs' summaries of those ticks are refused too; the totals are
read from what the second instance publishes.)

Why the seek did not hold before: aiokafka fetches a newly assigned partition from its committed
offset while ``on_partitions_assigned`` is still running, and ``getmany`` returned those records
to the loop, which ingested them before the restore had rebuilt the rows, set the floor and
sought: the restored rows then replaced the runs in the changelog, and a run evicted in between
came back with its old events. The daemon now pauses the partitions until the restore is done.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from daemon_process import daemon_on
from kafka_tools import committed_offsets, create_topics, produce_foreign, read_topic_foreign
from metricsd.devbroker import DevBroker

pytestmark = pytest.mark.integration

TS = 1_764_000_000.0


@pytest.fixture
def guarded_broker(tmp_path: Path) -> Any:
    """A broker of its own whose output topic ``guarded.out`` refuses the "blocked" run."""
    registry = tmp_path / "schemas"
    registry.mkdir()
    refuse_blocked = {"type": "object", "properties": {"value": {"not": {
        "type": "object", "required": ["run_id"], "properties": {"run_id": {"const": "blocked"}},
    }}}}  # fmt: skip
    (registry / "guarded.out.json").write_bytes(orjson.dumps(refuse_blocked))
    broker = DevBroker(log_path=tmp_path / "tansu.log", schema_registry=registry).start()
    try:
        yield broker
    finally:
        broker.stop()


def step(run: str, i: int, seconds: float) -> tuple[bytes, bytes, int]:
    event = {"type": "batch_time", "run_id": run, "seconds": seconds, "ts": TS + i}
    return run.encode(), orjson.dumps(event), 0


def end(run: str) -> tuple[bytes, bytes, int]:
    return run.encode(), orjson.dumps({"type": "run_end", "run_id": run}), 0


def stats_with(events: int, **more: int) -> Any:
    def match(line: dict[str, Any]) -> bool:
        return (
            line.get("event") == "stats"
            and line.get("events") == events
            and all(line.get(k, 0) >= v for k, v in more.items())
        )

    return match


def test_restart_resumes_at_the_checkpoint_not_the_commit(
    guarded_broker: DevBroker, tmp_path: Path
) -> None:
    broker, topic = guarded_broker, "guarded"
    create_topics(broker.bootstrap, {topic: 1})
    flags = ("--interval", "0.3", "--stats-interval", "0.2", "--time-window", "0",
             "--idle-timeout", "0")  # fmt: skip

    first = daemon_on(broker.bootstrap, topic, tmp_path / "first.log", *flags, "--max-runs", "2")
    with first:
        first.wait_for_log(lambda ln: ln.get("event") == "partitions_assigned", timeout=60)
        before = [step("live", i, 0.1 * (i + 1)) for i in range(3)]
        produce_foreign(broker.bootstrap, topic, before)
        first.wait_for_log(stats_with(3, commits=1), timeout=30)
        groups = [
            # Its summaries are refused from now on, so commits stop here. It ends at once: its
            # row leaves the changelog, and the next instance has nothing of it to publish.
            [step("blocked", 0, 1.0), end("blocked")],
            [*(step("ended", i, 0.5) for i in range(4)), end("ended")],
            [step("evicted", i, 2.0 + i) for i in range(5)],
            [step("live", 3 + i, 0.4 + 0.1 * i) for i in range(2)],
            [step("newcomer", 0, 9.0)],  # a third run: "evicted", least recently active, goes
        ]
        count = len(before)  # events ingested so far, run_end included
        commits = 0
        for group in groups:  # each its own ingest: recency follows this order exactly
            produce_foreign(broker.bootstrap, topic, group)
            count += len(group)
            commits = first.wait_for_log(stats_with(count), timeout=30)["commits"]
        held = [record for group in groups for record in group]
        # Many ticks of held-back commits: the refused summary is sent again at every tick.
        deadline = time.monotonic() + 30
        while len(failed_ticks(first)) < 10:
            assert time.monotonic() < deadline, first.tail()
            time.sleep(0.1)
        assert first.terminate() == 1  # the final tick could not publish "blocked"
    stopped = next(ln for ln in first.logs() if ln.get("event") == "stopped")
    assert stopped["flushed"] is False and stopped["events"] == count
    assert stopped["commits"] == commits  # none after the refused summary
    checkpoint = len(before) + len(held)
    (committed,) = committed_offsets(broker.bootstrap, f"{topic}-group", topic, [0]).values()
    assert committed is not None and committed < checkpoint

    after = [
        *(step("live", 5 + i, 0.6) for i in range(2)),
        step("ended", 10, 0.25),  # comes back after run_end: a new run of 1 event
        step("evicted", 10, 7.0),  # comes back after eviction: 1 event, no ghost of the 5
        step("newcomer", 1, 9.0),
    ]
    # Room for every run now: nothing is evicted after the restart.
    second = daemon_on(broker.bootstrap, topic, tmp_path / "second.log", *flags, "--max-runs", "9")
    with second:
        restored = second.wait_for_log(lambda ln: ln.get("event") == "state_restored", timeout=60)
        produce_foreign(broker.bootstrap, topic, after)
        second.wait_for_log(
            lambda ln: ln.get("event") == "stats" and ln["events"] >= len(after), timeout=30
        )
        out = read_topic_foreign(
            broker.bootstrap, f"{topic}.out", [0],
            until=lambda recs: len(latest_totals(recs)) >= 4
            and latest_totals(recs).get("newcomer") == 2,
            timeout=30,
        )  # fmt: skip
        second.terminate()
    assert restored["resume_offsets"] == {"0": checkpoint}
    stopped = next(ln for ln in second.logs() if ln.get("event") == "stopped")
    # Nothing before the checkpoint was ingested, whether the fetch returned it or not.
    assert stopped["records"] == len(after) and stopped["events"] == len(after)
    totals = latest_totals(out)
    assert totals == {"live": 7, "ended": 1, "evicted": 1, "newcomer": 2}, totals
    live = last_summary(out, "live")
    assert live["count"] == 7
    values = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.6]
    assert live["metrics"]["mean"] == pytest.approx(sum(values) / 7, rel=1e-12)


def failed_ticks(daemon: Any) -> list[dict[str, Any]]:
    return [ln for ln in daemon.logs() if ln.get("event") == "publish_failed"]


def summaries(records: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    out = [orjson.loads(v) for _, v, _, _ in records]
    return [r for r in out if r.get("type") == "summary"]


def latest_totals(records: list[tuple[Any, ...]]) -> dict[str, int]:
    """Each run's ``total`` in its last summary in topic order (one partition: the order of
    publication)."""
    return {r["run_id"]: r["total"] for r in summaries(records)}


def last_summary(records: list[tuple[Any, ...]], run: str) -> dict[str, Any]:
    return [r for r in summaries(records) if r["run_id"] == run][-1]
