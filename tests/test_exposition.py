"""The /metrics page from the daemon's state and from real summary records, and the HTTP server
that serves it (on a loopback port, no broker)."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from typing import Any

import numpy as np
import orjson
import pytest
from metricsd.config import MonitorSettings
from metricsd.events import BatchTime, Decoder, Prediction, RunEnd, Scalar
from metricsd.exposition import Exposition, Health, RunSeries, not_ready
from metricsd.monitor import Monitor
from metricsd.probes import Probes
from metricsd.summaries import steps_per_second
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

_decoder = Decoder()


def ev(**doc: Any) -> Any:
    return _decoder.decode(None, orjson.dumps(doc))


def samples(page: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a page, parsed by prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(page.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def run_samples(page: bytes, run_id: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {k: v for k, v in samples(page).items() if ("run_id", run_id) in k[1]}


def key(metric: str, /, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return metric, frozenset(labels.items())


def monitor_with_a_run(run: str = "r1", window: int = 50) -> tuple[Monitor, np.ndarray, float]:
    rng = np.random.default_rng(3)
    seconds = rng.lognormal(-2, 0.4, 80)
    monitor = Monitor(MonitorSettings(window=window, time_windows=()))
    t0 = 1_000.0
    events = [
        ev(type="batch_time", run_id=run, ts=t0 + 0.5 * i, seconds=float(s))
        for i, s in enumerate(seconds)
    ]
    events += [
        ev(type="scalar", run_id=run, ts=t0 + 50, name="loss", value=v)
        for v in (1.0, 2.0, None, 4.0)
    ]
    events.append(
        ev(
            type="prediction",
            run_id=run,
            ts=t0 + 60,
            task="binary",
            split="val",
            y_true=[0, 1, 1, 0, 1, 1],
            y_pred=[0, 1, 0, 0, 1, 0],
        )
    )
    events.append(
        ev(
            type="prediction",
            run_id=run,
            ts=t0 + 61,
            task="regression",
            split="test",
            y_true=[1.0, 2.0, 3.0, 4.0],
            y_pred=[1.1, 1.9, 3.2, 3.7],
        )
    )
    monitor.ingest(events, now=t0 + 100)
    return monitor, seconds, t0


def test_per_run_series_have_the_values_of_the_summary_records() -> None:
    """Step-time quantiles, steps/s, scalar mean and non-finite count, F1/accuracy and R² equal
    numpy's and sklearn's figures of the same window, and the newest event time is exact."""
    from sklearn import metrics as skm

    monitor, seconds, t0 = monitor_with_a_run(window=50)
    records = monitor.due(t0 + 100)
    runs = RunSeries(max_runs=10)
    runs.update(records)
    page = runs.text()
    got = samples(page)
    last = seconds[-50:]
    for q, p in (("0.5", 50), ("0.95", 95), ("0.99", 99)):
        assert got[key("metricsd_run_step_time_seconds", run_id="r1", quantile=q)] == (
            pytest.approx(np.percentile(last, p), rel=1e-12)
        )
    batch = next(r for r in records if r["stream"] == "batch_time")
    assert got[key("metricsd_run_steps_per_second", run_id="r1")] == pytest.approx(
        steps_per_second(batch)
    )
    assert got[key("metricsd_run_steps_per_second", run_id="r1")] == pytest.approx(49 / 24.5)
    assert got[key("metricsd_run_scalar_mean", run_id="r1", name="loss")] == pytest.approx(7 / 3)
    assert got[key("metricsd_run_scalar_non_finite", run_id="r1", name="loss")] == 1.0
    y_true, y_pred = [0, 1, 1, 0, 1, 1], [0, 1, 0, 0, 1, 0]
    quality = "metricsd_run_quality"
    assert got[key(quality, run_id="r1", split="val", metric="f1")] == pytest.approx(
        skm.f1_score(y_true, y_pred)
    )
    assert got[key(quality, run_id="r1", split="val", metric="accuracy")] == pytest.approx(
        skm.accuracy_score(y_true, y_pred)
    )
    assert got[key(quality, run_id="r1", split="test", metric="r2")] == pytest.approx(
        skm.r2_score([1.0, 2.0, 3.0, 4.0], [1.1, 1.9, 3.2, 3.7])
    )
    assert got[key("metricsd_run_last_event_timestamp_seconds", run_id="r1")] == t0 + 61


def test_per_run_lines_are_formatted_as_prometheus_client_formats_them() -> None:
    """The cached per-run text equals generate_latest of the same families built with
    prometheus_client (values such as NaN and 1e+09, label escaping), line for line."""
    monitor, _, t0 = monitor_with_a_run(run='we"ird\\run\nid')
    runs = RunSeries(max_runs=10)
    runs.update(monitor.due(t0 + 100))
    got = runs.text().decode()

    class Same:
        def collect(self) -> list[Metric]:
            families = []
            for family in text_string_to_metric_families(got):
                g = GaugeMetricFamily(family.name, family.documentation)
                g.type = family.type
                for s in family.samples:
                    g.add_sample(s.name, s.labels, s.value)
                families.append(g)
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Same())  # type: ignore[arg-type]
    assert generate_latest(registry).decode() == got
    assert 'run_id="we\\"ird\\\\run\\nid"' in got


def test_a_runs_series_vanish_after_run_end() -> None:
    """run_end publishes the run's final summaries: every series of that run goes, others stay."""
    monitor, _, t0 = monitor_with_a_run("r1")
    monitor.ingest([ev(type="batch_time", run_id="r2", ts=t0, seconds=[0.1, 0.2])], now=t0 + 100)
    runs = RunSeries(max_runs=10)
    runs.update(monitor.due(t0 + 100))
    assert run_samples(runs.text(), "r1") and run_samples(runs.text(), "r2")
    monitor.ingest([ev(type="run_end", run_id="r1")], now=t0 + 101)
    runs.update(monitor.due(t0 + 101))
    assert run_samples(runs.text(), "r1") == {}
    assert len(run_samples(runs.text(), "r2")) == 5  # 3 quantiles, steps/s, last event time
    assert "r1" not in runs and len(runs) == 1


def test_series_of_evicted_runs_vanish() -> None:
    """Idle and capacity eviction publish final summaries: the evicted runs' series go."""
    monitor = Monitor(MonitorSettings(window=10, time_windows=(), max_runs=2, idle_timeout=50))
    runs = RunSeries(max_runs=2)
    monitor.ingest([ev(type="batch_time", run_id=r, seconds=[0.1, 0.2]) for r in "ab"], now=0.0)
    runs.update(monitor.due(0.0))
    assert {"a", "b"} <= {r for r in "ab" if r in runs}
    monitor.ingest([ev(type="batch_time", run_id="c", seconds=[0.3])], now=1.0)  # evicts a
    runs.update(monitor.due(1.0))
    assert "a" not in runs and "b" in runs and "c" in runs
    assert run_samples(runs.text(), "a") == {}
    monitor.ingest([ev(type="batch_time", run_id="c", seconds=[0.3])], now=40.0)
    runs.update(monitor.due(60.0))  # b idle for 60 s > 50
    assert monitor.runs_evicted == {"idle": 1, "capacity": 1}
    assert sorted(r for r in "abc" if r in runs) == ["c"]


def test_forget_removes_the_runs_of_revoked_partitions() -> None:
    """forget (partition revoke) removes runs at once, without final summaries."""
    monitor, _, t0 = monitor_with_a_run("r1")
    runs = RunSeries(max_runs=10)
    runs.update(monitor.due(t0 + 100))
    before = runs.text()
    runs.forget(["r1", "unknown"])
    assert run_samples(before, "r1") and run_samples(runs.text(), "r1") == {}


def test_series_stay_bounded_with_20000_runs() -> None:
    """20,000 runs through a monitor with max_runs=100, 100 new runs per batch (each evicting the
    previous 100): at most 100 runs have series at any time, exactly those the monitor tracks."""
    monitor = Monitor(MonitorSettings(window=10, time_windows=(), max_runs=100))
    runs = RunSeries(max_runs=100)
    for chunk in range(200):
        events = [BatchTime(f"run-{chunk}-{i}", None, None, 0.1 * (i + 1)) for i in range(100)]
        monitor.ingest(events, now=float(chunk))
        runs.update(monitor.due(float(chunk)))
        assert len(runs) <= 100
    assert monitor.runs_evicted["capacity"] == 19_900
    page = runs.text()
    ids = {
        dict(labels)["run_id"]
        for (name, labels) in samples(page)
        if name == "metricsd_run_steps_per_second"
    }
    assert ids == {f"run-199-{i}" for i in range(100)}
    assert len(samples(page)) == 100 * 5
    p50 = samples(page)[key("metricsd_run_step_time_seconds", run_id="run-199-7", quantile="0.5")]
    assert p50 == pytest.approx(0.8)


def test_run_series_keep_at_most_max_runs_by_themselves() -> None:
    """Without a monitor's finals, the least recently updated runs go beyond max_runs."""
    runs = RunSeries(max_runs=3)
    record = {"type": "summary", "stream": "batch_time", "window": {"kind": "count"}}
    for r in "abcde":
        runs.update([dict(record, run_id=r, metrics={"median": 1.0}, count=1)])
    runs.update([dict(record, run_id="c", metrics={"median": 2.0}, count=1)])
    runs.update([dict(record, run_id="f", metrics={"median": 2.0}, count=1)])
    assert [r for r in "abcdef" if r in runs] == ["c", "e", "f"]


def test_per_run_metrics_off_shows_no_run_series() -> None:
    """per_run_metrics false: no metricsd_run_ line at all."""
    monitor, _, t0 = monitor_with_a_run()
    exposition = Exposition(Health, max_runs=10, per_run_metrics=False)
    exposition.runs.update(monitor.due(t0 + 100))
    page = exposition.render()
    assert b"metricsd_run_" not in page and b"metricsd_events_consumed_total" in page
    assert len(exposition.runs) == 0


def test_health_series_have_the_daemons_figures() -> None:
    """The health families carry the snapshot's numbers under the contract's names."""
    monitor, _, _ = monitor_with_a_run()
    by_type: Counter[type] = Counter({BatchTime: 80, Scalar: 4, Prediction: 2, RunEnd: 1})
    health = Health(
        events_by_type=by_type,
        dead_letters_by_reason=Counter({"malformed_json": 3, "schema": 2}),
        summaries=17,
        publish_failures=2,
        publish_dropped=1,
        lag={("in", 0): 5, ("in", 3): 0},
        runs_tracked=monitor.runs_tracked,
        evictions=monitor.runs_evicted,
        restore_pending=0,
        restore_records=42,
        profiler_overhead=0.01,
        started=True,
        assigned=2,
        fetched=True,
    )
    exposition = Exposition(lambda: health, max_runs=10)
    exposition.observe_tick(0.02, 1234.5)
    exposition.observe_tick(3.0, 1240.0)
    got = samples(exposition.render())
    assert got[key("metricsd_events_consumed_total", type="batch_time")] == 80
    assert got[key("metricsd_events_consumed_total", type="prediction")] == 2
    assert got[key("metricsd_events_consumed_total", type="attention")] == 0
    assert got[key("metricsd_dead_letters_total", reason="malformed_json")] == 3
    assert got[key("metricsd_summaries_published_total")] == 17
    assert got[key("metricsd_publish_failures_total")] == 2
    assert got[key("metricsd_publish_dropped_total")] == 1
    assert got[key("metricsd_consumer_lag_records", topic="in", partition="0")] == 5
    assert got[key("metricsd_runs_tracked")] == 1
    assert got[key("metricsd_evictions_total", reason="run_end")] == 1
    assert got[key("metricsd_evictions_total", reason="idle")] == 0
    assert got[key("metricsd_restore_records_total")] == 42
    assert got[key("metricsd_restore_partitions_pending")] == 0
    assert got[key("metricsd_profiler_overhead_ratio")] == 0.01
    assert got[key("metricsd_ready")] == 1
    assert got[key("metricsd_last_tick_timestamp_seconds")] == 1240.0
    assert got[key("metricsd_tick_duration_seconds_count")] == 2
    assert got[key("metricsd_tick_duration_seconds_bucket", le="0.025")] == 1
    assert got[key("metricsd_tick_duration_seconds_bucket", le="2.5")] == 1
    assert got[key("metricsd_tick_duration_seconds_sum")] == pytest.approx(3.02)
    assert any(name == "metricsd_build_info" for name, _ in got)


@pytest.mark.parametrize(
    ("health", "reason"),
    [
        (Health(), "starting"),
        (Health(started=True), "no partitions assigned"),
        (Health(started=True, assigned=2, restore_pending=2), "restoring"),
        (Health(started=True, assigned=2, fetched=False), "no fetch"),
        (Health(started=True, assigned=2, fetched=True, last_tick_ok=False), "last tick"),
        (Health(started=True, assigned=2, fetched=True), None),
        (
            Health(started=True, assigned=2, fetched=True, tick_waiting=11, tick_patience=10),
            "tick in flight",
        ),
        (Health(started=True, assigned=2, fetched=True, tick_waiting=9, tick_patience=10), None),
        (Health(started=True, assigned=2, fetched=True, stopping=True), "stopping"),
    ],
)
def test_readiness(health: Health, reason: str | None) -> None:
    """Ready only when started, assigned, restored, fetched, the last tick went through, and
    not shutting down."""
    got = not_ready(health)
    assert got == reason if reason is None else (got is not None and reason in got)


def test_a_scrape_with_10000_runs_is_cached_between_changes() -> None:
    """10,000 runs: the page is built once after a change and then served from the cache."""
    runs = RunSeries(max_runs=10_000)
    record = {"type": "summary", "stream": "batch_time", "window": {"kind": "count"}}
    runs.update(
        dict(record, run_id=f"r{i}", metrics={"median": 0.1, "p95": 0.2, "p99": 0.3}, count=1)
        for i in range(10_000)
    )
    first = runs.text()
    assert runs.text() is first
    assert len(first.splitlines()) == 10_000 * 4 + 12  # no event times in these records
    runs.update([dict(record, run_id="r5", metrics={"median": 9.0}, count=1)])
    assert runs.text() is not first and b'{quantile="0.5",run_id="r5"} 9.0' in runs.text()
    assert math.isnan(samples(runs.text())[key("metricsd_run_steps_per_second", run_id="r5")])


# -- the HTTP server -----------------------------------------------------------------------------


async def _request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def _probes(**kw: Any) -> tuple[Probes, list[str | None]]:
    state: list[str | None] = ["joining"]
    probes = Probes("127.0.0.1", 0, lambda: b"m 1\n", lambda: state[0], **kw)
    return probes, state


def test_http_paths_methods_and_readiness() -> None:
    """GET /metrics, /livez, /readyz (503 with the reason, then 200); 404 and 405 otherwise."""

    async def main() -> None:
        probes, state = _probes()
        await probes.start()
        try:
            port = probes.port
            status, headers, body = await _request(port, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert (status, body) == (200, b"m 1\n")
            assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert headers["Content-Length"] == "4"
            assert (await _request(port, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 200
            status, _, body = await _request(port, b"GET /readyz HTTP/1.1\r\n\r\n")
            assert (status, body) == (503, b"joining\n")
            state[0] = None
            assert (await _request(port, b"GET /readyz?x=1 HTTP/1.1\r\n\r\n"))[0] == 200
            assert (await _request(port, b"GET /other HTTP/1.1\r\n\r\n"))[0] == 404
            status, headers, _ = await _request(port, b"POST /metrics HTTP/1.1\r\n\r\n")
            assert (status, headers["Allow"]) == (405, "GET")
            assert (await _request(port, b"HEAD /livez HTTP/1.1\r\n\r\n"))[0] == 405
            assert (await _request(port, b"garbage\r\n\r\n"))[0] == 400
            assert probes.url == f"http://127.0.0.1:{port}"
        finally:
            await probes.stop()

    asyncio.run(main())


def test_slow_oversized_and_excess_clients_cannot_stall_the_server() -> None:
    """A client that never finishes its request is cut after the timeout, an oversized one at
    once; beyond max_connections a client is cut; once the slow ones are gone others are served."""

    async def main() -> None:
        probes, _ = _probes(timeout=0.3, max_request=1024, max_connections=2)
        await probes.start()
        try:
            port = probes.port
            _, hung = await asyncio.open_connection("127.0.0.1", port)
            hung.write(b"GET /metrics HTTP/1.1\r\n")  # never ends its head
            reader, big = await asyncio.open_connection("127.0.0.1", port)
            big.write(b"GET /" + b"x" * 4096 + b" HTTP/1.1\r\n\r\n")
            assert await asyncio.wait_for(reader.read(), 2) == b""  # closed, no answer
            await asyncio.sleep(0.05)
            _, hung2 = await asyncio.open_connection("127.0.0.1", port)
            hung2.write(b"GET /livez HTTP/1.1\r\n")
            await asyncio.sleep(0.05)
            with pytest.raises((ConnectionResetError, IndexError, ValueError)):
                await _request(port, b"GET /livez HTTP/1.1\r\n\r\n")  # cut: no status line
            assert probes.refused == 1  # the two hung clients hold both slots
            started = asyncio.get_running_loop().time()
            await asyncio.sleep(0.4)  # past the timeout: both hung clients were cut
            assert (await _request(port, b"GET /livez HTTP/1.1\r\n\r\n"))[0] == 200
            assert asyncio.get_running_loop().time() - started < 2
            for w in (hung, big, hung2):
                w.close()
        finally:
            await probes.stop()

    asyncio.run(main())


def test_a_failing_page_is_a_500_and_the_server_goes_on() -> None:
    """An exception while rendering is answered 500; the next request is served."""
    calls: list[int] = []

    def page() -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bug")
        return b"ok 1\n"

    async def main() -> None:
        probes = Probes("127.0.0.1", 0, page, lambda: None)
        await probes.start()
        try:
            assert (await _request(probes.port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 500
            assert (await _request(probes.port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200
        finally:
            await probes.stop()

    asyncio.run(main())


# -- from the pipeline ---------------------------------------------------------------------------


def test_the_pipeline_counts_consumed_events_by_type() -> None:
    """Pipeline.consume counts events by type, on the all-batch-time fast path and otherwise, and
    the service's health snapshot carries them (not ready before it subscribed)."""
    from metricsd import kafka
    from metricsd.config import Settings
    from metricsd.service import Service

    service = Service(Settings(http_port=0))
    tp = kafka.TopicPartition("training.events", 0)

    def records(*docs: dict[str, Any]) -> list[Any]:
        return [
            kafka.ConsumerRecord(tp.topic, 0, i, 0, 0, None, orjson.dumps(d), None, 0, 0, [])
            for i, d in enumerate(docs)
        ]

    batch = {"type": "batch_time", "run_id": "r", "seconds": 0.1}
    asyncio.run(service.pipeline.consume({tp: records(batch, batch, batch)}))
    scalar = {"type": "scalar", "run_id": "r", "name": "loss", "value": 1.0}
    asyncio.run(
        service.pipeline.consume(
            {tp: records(batch, scalar, scalar, {"type": "run_end", "run_id": "r"})}
        )
    )
    health = service.health()
    assert dict(health.events_by_type) == {BatchTime: 4, Scalar: 2, RunEnd: 1}
    assert not_ready(health) == "starting: waiting for the broker"
    got = samples(service.exposition.render())
    assert got[key("metricsd_events_consumed_total", type="batch_time")] == 4
    assert got[key("metricsd_evictions_total", reason="run_end")] == 1
    assert got[key("metricsd_ready")] == 0


def test_the_page_has_exactly_the_series_of_deploy_metrics_txt() -> None:
    """deploy/metrics.txt is what the alert rules and the dashboard are checked against
    (tests/test_deploy.py); this holds the exporter to it: every family of a page with every
    kind of series present has the contract's name, type and label names, and nothing else.
    (The step-time quantiles are a Prometheus ``summary``: promtool refuses a ``quantile``
    label on a gauge; queries read them the same way.)"""
    from pathlib import Path

    contract: dict[str, tuple[str, frozenset[str]]] = {}
    text = (Path(__file__).resolve().parents[1] / "deploy" / "metrics.txt").read_text()
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, kind, *labels = line.split()
            contract[name] = (kind, frozenset(labels[0].split(",")) if labels else frozenset())
    monitor, _, _ = monitor_with_a_run()
    health = Health(
        events_by_type=Counter({BatchTime: 3}),
        dead_letters_by_reason=Counter({"schema": 1}),
        lag={("in", 0): 5},
        evictions={"idle": 1},
        profiler_overhead=0.01,
    )
    exposition = Exposition(lambda: health, max_runs=10)
    exposition.observe_tick(0.02, 1234.5)
    exposition.runs.update(monitor.due(2_000.0))
    found: dict[str, tuple[str, frozenset[str]]] = {}
    for family in text_string_to_metric_families(exposition.render().decode()):
        name = family.name + ("_total" if family.type == "counter" else "")
        if name.endswith("_created"):  # prometheus_client's creation time of a histogram
            continue
        labels = {k for s in family.samples for k in s.labels if k not in ("le",)}
        kind = "gauge" if name == "metricsd_run_step_time_seconds" else family.type
        if name == "metricsd_run_step_time_seconds":
            assert family.type == "summary"
        found[name] = (kind, frozenset(labels))
    assert found == contract


def test_a_distributed_runs_steps_per_second_counts_steps_not_every_ranks_batches() -> None:
    """Each step of a run of 4 ranks sends 4 batch times: its steps/s gauge is the batch_time
    summary's rate divided by the ranks summary's count of ranks."""
    monitor = Monitor(MonitorSettings(window=100, time_windows=()))
    events = [
        ev(type="batch_time", run_id="d", ts=1_000.0 + 0.5 * step, seconds=0.1, rank=rank)
        for step in range(40)
        for rank in range(4)
    ]
    monitor.ingest(events, 1_030.0)
    records = monitor.due(1_030.0)
    runs = RunSeries(10)
    runs.update(records)
    (batch,) = [r for r in records if r["stream"] == "batch_time"]
    rate = steps_per_second(batch)
    assert rate is not None
    got = samples(runs.text())
    assert got[key("metricsd_run_steps_per_second", run_id="d")] == pytest.approx(rate / 4)
    assert rate / 4 == pytest.approx(2.0, rel=0.05)  # one step every 0.5 s
