"""Summary ids under run churn: one id names one content, whatever comes back or who publishes.

The Monitor is fed as the pipeline feeds it: events of one partition with their input offsets
(``Feed`` numbers them like a partition log). Every published summary is collected and the
invariant checked is the consumer's: no ``id`` ever carries two different contents (``emitted_at``
aside, which a re-publication may change).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest
from metricsd.changelog import Changelog, Restore
from metricsd.config import MonitorSettings
from metricsd.events import BatchTime, Event, Prediction, RunEnd, Scalar
from metricsd.monitor import MAX_SPLITS, Monitor
from metricsd.summaries import Summaries

Record = dict[str, Any]


class Feed:
    """Input partitions as logs: ``ingest`` passes the offsets of the events, like the pipeline."""

    def __init__(self) -> None:
        self.next: dict[int, int] = {}

    def ingest(self, monitor: Monitor, events: Sequence[Event], now: float, p: int = 0) -> None:
        start = self.next.get(p, 0)
        self.next[p] = start + len(events)
        monitor.ingest(events, now, p, list(range(start, start + len(events))))


def _bt(run: str, *values: float) -> BatchTime:
    return BatchTime(run, None, None, np.array(values, dtype=np.float64))


def _content(record: Record) -> bytes:
    return orjson.dumps({k: v for k, v in record.items() if k != "emitted_at"})


def _assert_ids_unique(records: list[Record]) -> dict[str, bytes]:
    """Every id maps to one content; returns id -> content."""
    seen: dict[str, bytes] = {}
    for record in records:
        content = _content(record)
        held = seen.setdefault(record["id"], content)
        assert held == content, f"id {record['id']} carries two contents"
    return seen


def test_a_run_that_ended_comes_back_with_a_new_incarnation_and_disjoint_ids() -> None:
    """run_end, then the same run id again: new incarnation (a later offset), seq from 0 again,
    and no id of the first life is reused although total and mean differ."""
    monitor, feed = Monitor(MonitorSettings(window=10, time_windows=(60.0,)), group="g"), Feed()
    feed.ingest(monitor, [_bt("back", 1.0, 1.0, 1.0), _bt("back", 1.0)], 100.0)
    first = monitor.due(100.0)
    feed.ingest(monitor, [RunEnd("back", None)], 101.0)
    finals = monitor.due(101.0)
    feed.ingest(monitor, [_bt("back", 5.0)], 102.0)
    again = monitor.due(102.0)
    assert {r["incarnation"] for r in first + finals} == {"0:0"}
    assert {r["incarnation"] for r in again} == {"0:3"}
    assert [r["seq"] for r in first] == [0, 0] and [r["seq"] for r in again] == [0, 0]
    assert all(r["final"] for r in finals) and [r["total"] for r in again] == [1, 1]
    assert not {r["id"] for r in first + finals} & {r["id"] for r in again}
    assert again[0]["id"] == "g|back|batch_time|0:3|count:10|0"
    _assert_ids_unique(first + finals + again)


def test_a_run_evicted_for_capacity_or_idleness_comes_back_with_a_new_incarnation() -> None:
    """Capacity eviction (a third run with max_runs=2) and idle eviction both end a life: the
    returning run's summaries carry a new incarnation and ids never seen before."""
    settings = MonitorSettings(window=10, time_windows=(), max_runs=2, idle_timeout=50.0)
    monitor, feed = Monitor(settings, group="g"), Feed()
    records: list[Record] = []
    feed.ingest(monitor, [_bt("a", 1.0), _bt("b", 2.0)], 0.0)
    records += monitor.due(0.0)
    feed.ingest(monitor, [_bt("c", 3.0)], 1.0)  # evicts a (least recently active)
    records += monitor.due(1.0)
    feed.ingest(monitor, [_bt("a", 10.0)], 2.0)  # a comes back, evicting b
    records += monitor.due(2.0)
    assert monitor.runs_evicted == {"idle": 0, "capacity": 2}
    lives = [(r["incarnation"], r["final"], r["total"]) for r in records if r["run_id"] == "a"]
    assert lives == [("0:0", False, 1), ("0:0", True, 1), ("0:3", False, 1)]
    records += monitor.due(100.0)  # a and c idle: evicted
    feed.ingest(monitor, [_bt("a", 7.0)], 101.0)
    records += monitor.due(101.0)
    assert monitor.runs_evicted["idle"] == 2
    a = [r for r in records if r["run_id"] == "a"]
    assert [r["incarnation"] for r in a][-1] == "0:4"
    assert len({r["incarnation"] for r in a}) == 3
    _assert_ids_unique(records)


def test_a_stream_closed_by_the_split_limit_or_a_task_change_gets_a_new_incarnation() -> None:
    """The oldest split closed for a ninth, then sent again; a split whose task changes: each new
    window of the same (run, stream) has its own incarnation, so seq 0 is never repeated."""
    monitor, feed = Monitor(MonitorSettings(window=10, time_windows=()), group="g"), Feed()
    y = np.array([0, 1], dtype=np.int64)
    records: list[Record] = []
    for i in range(MAX_SPLITS + 1):
        feed.ingest(monitor, [Prediction("r", None, "binary", f"s{i}", y, y)], float(i))
        records += monitor.due(float(i))
    feed.ingest(monitor, [Prediction("r", None, "binary", "s0", y, 1 - y)], 20.0)
    feed.ingest(monitor, [Prediction("r", None, "regression", "s1", y * 1.0, y * 1.0)], 20.0)
    records += monitor.due(20.0)
    s0 = [r["incarnation"] for r in records if r["stream"] == "prediction/s0"]
    assert s0 == ["0:0", "0:0", "0:9"]  # summary, final (closed by s8), the new window
    s1 = [(r["incarnation"], r["task"]) for r in records if r["stream"] == "prediction/s1"]
    assert s1[0] == ("0:1", "binary") and s1[-1] == ("0:10", "regression")
    _assert_ids_unique(records)


def test_two_groups_never_share_an_id() -> None:
    """The same input summarised by daemons of two groups: same figures, disjoint ids."""
    a, b = (
        Monitor(MonitorSettings(window=10), group="one"),
        Monitor(MonitorSettings(window=10), group="two"),
    )
    for monitor in (a, b):
        Feed().ingest(monitor, [_bt("r", 1.0, 2.0), Scalar("r", None, None, "loss", 0.5)], 5.0)
    ra, rb = a.due(5.0), b.due(5.0)
    assert [_content(r["metrics"]) for r in ra] == [_content(r["metrics"]) for r in rb]
    assert {r["group"] for r in ra} == {"one"} and {r["group"] for r in rb} == {"two"}
    assert not {r["id"] for r in ra} & {r["id"] for r in rb}


def test_names_with_the_separator_cannot_forge_an_id() -> None:
    """A ``|`` inside a run id or scalar name is escaped: ("a|b", "x") and ("a", "b|x")-like
    splits give different ids."""
    monitor, feed = Monitor(MonitorSettings(window=4, time_windows=()), group="g|h"), Feed()
    feed.ingest(
        monitor, [Scalar("a|b", None, None, "x", 1.0), Scalar("a", None, None, "b|x", 2.0)], 1.0
    )
    ids = [r["id"] for r in monitor.due(1.0)]
    assert ids == ["g\\|h|a\\|b|scalar/x|0:0|count:4|0", "g\\|h|a|scalar/b\\|x|0:1|count:4|0"]


def test_restore_keeps_incarnation_and_seq() -> None:
    """Through the changelog (encode, restore): the restored window continues its seq under the
    same incarnation, so its next ids are the ones the first instance would have published."""
    settings = MonitorSettings(window=10, time_windows=())
    first, feed = Monitor(settings, track_changes=True, group="g"), Feed()
    feed.ingest(first, [_bt("x", 1.0)], 1.0, p=3)
    feed.ingest(first, [_bt("x", 2.0)], 2.0, p=3)
    first.due(2.0)
    changelog = Changelog()
    changelog.assign([3])
    placed = changelog.tick({3: 2}, *first.state_changes())
    restore = Restore([3], "t")
    for _, (key, value) in [*placed, *restore.fences]:
        restore.feed(3, key, value)
    second = Monitor(settings, track_changes=True, group="g")
    for p, state in restore.result().rows:
        assert state.incarnation == "3:0"
        second.restore(state, p)
    for monitor in (first, second):
        monitor.ingest([_bt("x", 3.0)], 3.0, 3, [2])
    expected = first.due(3.0)
    assert second.due(3.0) == expected
    assert expected[0]["id"] == "g|x|batch_time|3:0|count:10|1"


def test_churn_through_max_runs_never_gives_one_id_two_contents() -> None:
    """1,600 run ids cycling through max_runs=50 (each id comes back many times, evicted for
    capacity, for idleness or by run_end), three stream kinds, 4 partitions: every id carries one
    content, and a consumer de-duplicating on id keeps every summary."""
    rng = np.random.default_rng(11)
    settings = MonitorSettings(window=8, time_windows=(5.0,), max_runs=50, idle_timeout=3.0)
    monitor, feed = Monitor(settings, group="g"), Feed()
    records: list[Record] = []
    y = np.array([1, 0, 1], dtype=np.int64)
    now = 0.0
    for step in range(300):
        for p in range(4):
            events: list[Event] = []
            for run in rng.integers(0, 400, 12):
                name = f"run-{run}-{p}"
                roll = rng.random()
                if roll < 0.05:
                    events.append(RunEnd(name, None))
                elif roll < 0.5:
                    events.append(_bt(name, float(rng.random())))
                elif roll < 0.8:
                    events.append(Scalar(name, None, None, "loss", float(rng.random())))
                else:
                    events.append(Prediction(name, None, "binary", "val", y, rng.integers(0, 2, 3)))
            feed.ingest(monitor, events, now, p)
        records += monitor.due(now)
        now += 0.5 if step % 50 else 10.0  # a pause: every run is idle at the next tick
    evicted = monitor.runs_evicted
    assert evicted["capacity"] > 5000 and evicted["idle"] > 0
    seen = _assert_ids_unique(records)
    lives = {(r["run_id"], r["stream"], r["incarnation"]) for r in records}
    streams = {(r["run_id"], r["stream"]) for r in records}
    assert len(lives) > 2 * len(streams)  # ids came back many times
    store = Summaries()
    store.extend(records)
    assert len(store) == len(seen) == len({r["id"] for r in records})
    assert store.duplicates == len(records) - len(seen)


def test_evictions_cost_one_statistics_pass_per_tick_not_one_per_run() -> None:
    """2,000 new runs, one per ingest (as small fetches deliver them), through max_runs=100: the
    finals of the evicted runs are computed together, at the tick or when the reserve of 13
    retired rows fills, never one pass per evicted run; each evicted run gets exactly one final
    summary, holding its whole window."""
    from metricsd.profiler import Profiler

    profiler = Profiler()
    monitor = Monitor(MonitorSettings(window=8, time_windows=(), max_runs=100), profiler)
    feed = Feed()
    records: list[Record] = []
    for i in range(2000):
        feed.ingest(monitor, [_bt(f"r{i}", float(i), 1.0)], float(i))
        if i % 500 == 499:
            records += monitor.due(float(i))
    passes = {op["name"]: op["count"] for op in profiler.report(1.0)["operations"]}
    evicted = monitor.runs_evicted["capacity"]
    assert evicted == 1900
    assert 0 < monitor.retire_passes <= evicted // 13
    # One pass per full reserve, plus at most two per due (the dirty rows, the retired ones).
    assert passes["batch_time_stats"] <= monitor.retire_passes + 2 * 4
    finals = [r for r in records if r["final"]]
    assert sorted(r["run_id"] for r in finals) == sorted({r["run_id"] for r in finals})
    assert len(finals) == evicted and monitor.backlog == 0
    assert all(
        r["count"] == 2 and r["metrics"]["mean"] == (int(r["run_id"][1:]) + 1) / 2 for r in finals
    )


class _Producer:
    """Acknowledges every send and batch at once; remembers the most records ever unacknowledged
    (the outbox counts the records it is handing over as pending already)."""

    def __init__(self) -> None:
        self.outbox: Any = None
        self.sent: list[tuple[str, bytes | None]] = []
        self.most_unacked = 0

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: Any = None,
    ) -> Any:
        self.sent.append((topic, value))
        return self._acked()

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(8))

    def create_batch(self) -> Any:
        return _Batch()

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> Any:
        self.sent += [(topic, value) for value in batch.values]
        return self._acked()

    def _acked(self) -> Any:
        import asyncio

        self.most_unacked = max(self.most_unacked, self.outbox.pending)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


class _Batch:
    """A batch builder that never fills up (the outbox's batching is tested in test_outbox)."""

    def __init__(self) -> None:
        self.values: list[bytes | None] = []

    def append(self, *, timestamp: Any, key: bytes | None, value: bytes | None) -> Any:
        self.values.append(value)
        return True

    def close(self) -> None:
        pass


class _Consumer:
    def __init__(self) -> None:
        self.commits: list[Any] = []

    async def commit(self, offsets: Any) -> None:
        self.commits.append(offsets)


def _pipeline(max_runs: int) -> tuple[Any, _Producer, _Consumer, Any]:
    """A pipeline (changelog off, window 8 plus a 60 s window) on fakes that acknowledge at once,
    assigned partition 0 of "in"."""
    from metricsd import kafka
    from metricsd.config import Settings
    from metricsd.pipeline import Pipeline
    from metricsd.profiler import Profiler

    monitor_settings = MonitorSettings(window=8, time_windows=(60.0,), max_runs=max_runs)
    settings = Settings(
        bootstrap_servers="unused:9092", input_topic="in", group_id="g", changelog=False,
        monitor=monitor_settings,
    )  # fmt: skip
    pipeline = Pipeline(settings, "test", Profiler())
    producer, consumer = _Producer(), _Consumer()
    pipeline.use_producer(producer)
    producer.outbox = pipeline.outbox
    pipeline.use_consumer(consumer)
    tp = kafka.TopicPartition("in", 0)
    pipeline.assigned.add(tp)
    return pipeline, producer, consumer, tp


def _batch_times(runs: list[str]) -> list[Any]:
    """One batch_time record per entry of ``runs``, at offsets 0, 1, ... of partition 0."""
    from metricsd import kafka

    values = [orjson.dumps({"type": "batch_time", "run_id": r, "seconds": 0.1}) for r in runs]
    return [
        kafka.ConsumerRecord("in", 0, offset, 0, 0, run.encode(), value, None, 4, 40, [])
        for offset, (run, value) in enumerate(zip(runs, values, strict=True))
    ]


@pytest.mark.parametrize("size", [499, 500, 501, 999, 1000, 1500, 2000, 4000])
def test_a_probed_batch_is_ingested_exactly_once(size: int) -> None:
    """A batch larger than the room for new runs but bringing few of them (100 runs, max_runs
    500) goes in as probes of doubling size; every record is ingested once. Before, a probe that
    reached the batch's length handed the whole batch again: a 1,000-record batch counted 1,500
    events (seen in CI as 40,500 events for 40,000 in test_churn_broker)."""
    import asyncio

    pipeline, producer, consumer, tp = _pipeline(500)
    runs = [f"r{i % 100}" for i in range(size)]

    async def go() -> None:
        await pipeline.consume({tp: _batch_times(runs)})
        await pipeline.tick()

    asyncio.run(go())
    assert pipeline.counters.events == size
    assert consumer.commits[-1][tp].offset == size
    summaries = [orjson.loads(v) for t, v in producer.sent if t == "training.summaries" and v]
    totals = {s["run_id"]: s["total"] for s in summaries if s["window"]["kind"] == "count"}
    assert totals == {f"r{i}": runs.count(f"r{i}") for i in range(100)}


def test_the_pipeline_slices_churn_and_ticks_early_so_unacked_sends_stay_bounded() -> None:
    """One fetched batch of 6,000 new runs on a partition (max_runs 100, changelog off): the
    pipeline ingests it in slices once evictions start and ticks as soon as 3,000 finals wait,
    so the outbox never holds more than a bounded number of sends, every offset is committed,
    and every run's final summaries are published exactly once under unique ids."""
    import asyncio

    from metricsd.pipeline import BACKLOG_RECORDS

    pipeline, producer, consumer, tp = _pipeline(100)
    records = _batch_times([f"r{offset}" for offset in range(6000)])

    async def go() -> None:
        await pipeline.consume({tp: records})
        await pipeline.tick()

    asyncio.run(go())
    summaries = [orjson.loads(v) for t, v in producer.sent if t == "training.summaries" and v]
    assert pipeline.counters.early_ticks >= 3  # 5,900 evictions x 2 finals, 3,000 a tick
    # Live rows' summaries + the backlog limit + what one 100-record slice can add.
    print("most unacknowledged", producer.most_unacked)
    assert producer.most_unacked <= 100 * 2 + BACKLOG_RECORDS + 2 * 100 * 2
    assert consumer.commits[-1][tp].offset == 6000
    finals = [s for s in summaries if s["final"]]
    assert len(finals) == 2 * 5900  # count and time window of every evicted run
    assert len({s["id"] for s in summaries}) == len(summaries)
    assert {s["incarnation"] for s in finals if s["run_id"] == "r42"} == {"0:42"}
