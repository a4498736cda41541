"""The core: events in, summaries out, checked against oracles computed from the same events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from metricsd.config import MonitorSettings
from metricsd.events import Decoder
from metricsd.monitor import MAX_SPLITS, Monitor
from metricsd.profiler import Profiler
from metricsd.records import encode
from scipy import stats as sps
from sklearn import metrics as skm

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
_decoder = Decoder()


def ev(**doc: Any) -> Any:
    """An event as the daemon would decode it from the wire."""
    return _decoder.decode(None, orjson.dumps(doc))


@pytest.fixture(scope="module")
def summary_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / "summary.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def by_window(records: list[dict[str, Any]], run: str, stream: str) -> dict[str, dict[str, Any]]:
    out = {}
    for r in records:
        if r["run_id"] == run and r["stream"] == stream:
            w = r["window"]
            out["count" if w["kind"] == "count" else f"time:{w['seconds']:g}"] = r
    return out


def wire(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records as a consumer of the summary topic sees them (NaN -> null)."""
    return [orjson.loads(encode(r)) for r in records]


def test_batch_time_count_window_matches_scipy(
    summary_validator: jsonschema.Draft202012Validator,
) -> None:
    """The count window of batch times has scipy/numpy statistics of the newest N values."""
    rng = np.random.default_rng(1)
    seconds = rng.lognormal(-2, 0.3, 250)
    monitor = Monitor(MonitorSettings(window=100, time_windows=()))
    events = [
        ev(type="batch_time", run_id="r1", ts=1000.0 + i, step=i, seconds=float(s))
        for i, s in enumerate(seconds)
    ]
    monitor.ingest(events[:120], now=2000.0)
    monitor.ingest(events[120:], now=2000.0)
    records = wire(monitor.due(now=2001.0))
    assert len(records) == 1
    rec = records[0]
    summary_validator.validate(rec)
    window = seconds[-100:]
    m = rec["metrics"]
    assert rec["count"] == m["count"] == 100 and rec["total"] == 250
    assert rec["window"] == {"kind": "count", "size": 100}
    assert m["mean"] == pytest.approx(np.mean(window), rel=1e-12)
    assert m["std"] == pytest.approx(np.std(window), rel=1e-9)
    assert m["median"] == pytest.approx(np.median(window), rel=1e-12)
    assert m["p95"] == pytest.approx(np.percentile(window, 95), rel=1e-12)
    assert m["p99"] == pytest.approx(np.percentile(window, 99), rel=1e-12)
    assert m["min"] == window.min() and m["max"] == window.max()
    assert m["cv"] == pytest.approx(sps.variation(window), rel=1e-9)
    assert m["skewness"] == pytest.approx(sps.skew(window), rel=1e-9)
    assert m["kurtosis"] == pytest.approx(sps.kurtosis(window), rel=1e-9)
    assert rec["first_ts"] == 1150.0 and rec["last_ts"] == 1249.0
    assert rec["seq"] == 0 and rec["final"] is False
    # Ingested without offsets or group: both parts of the id are empty (tests/test_churn.py).
    assert rec["id"] == "|r1|batch_time||count:100|0"
    assert rec["group"] == "" and rec["incarnation"] == ""


def test_time_windows_select_by_event_time() -> None:
    """A time window holds the values within T seconds of the stream's newest event time."""
    monitor = Monitor(MonitorSettings(window=1000, time_windows=(10.0, 1000.0)))
    values = np.arange(50, dtype=float)
    monitor.ingest(
        [
            ev(type="batch_time", run_id="r", ts=float(i), seconds=float(v))
            for i, v in enumerate(values)
        ],
        now=100.0,
    )
    windows = by_window(wire(monitor.due(100.0)), "r", "batch_time")
    assert set(windows) == {"count", "time:10", "time:1000"}
    ten = windows["time:10"]
    assert ten["count"] == 10  # ts 40..49 are > 49 - 10
    assert ten["metrics"]["mean"] == pytest.approx(np.mean(values[40:]))
    assert ten["first_ts"] == 40.0 and ten["last_ts"] == 49.0
    assert ten["window"] == {"kind": "time", "seconds": 10.0, "truncated": False}
    assert windows["time:1000"]["metrics"] == windows["count"]["metrics"]
    assert len({r["seq"] for r in windows.values()}) == 1


def test_time_window_reports_truncation_when_the_buffer_is_too_short() -> None:
    """When the count window evicted values still inside T, the time window says truncated."""
    monitor = Monitor(MonitorSettings(window=5, time_windows=(100.0,)))
    monitor.ingest(
        [ev(type="batch_time", run_id="r", ts=float(i), seconds=1.0) for i in range(20)], now=0.0
    )
    windows = by_window(wire(monitor.due(0.0)), "r", "batch_time")
    assert windows["time:100"]["window"]["truncated"] is True
    assert windows["time:100"]["count"] == 5


def test_only_streams_with_new_data_are_summarised_and_seq_advances() -> None:
    """A tick without new data for a stream publishes nothing for it; seq counts its ticks."""
    monitor = Monitor(MonitorSettings(window=10, time_windows=()))
    monitor.ingest(
        [
            ev(type="batch_time", run_id="a", seconds=0.1),
            ev(type="batch_time", run_id="b", seconds=0.2),
        ],
        now=1.0,
    )
    assert {r["run_id"] for r in monitor.due(1.0)} == {"a", "b"}
    assert monitor.due(2.0) == []
    monitor.ingest([ev(type="batch_time", run_id="a", seconds=[0.3, 0.4])], now=3.0)
    records = monitor.due(3.0)
    assert [(r["run_id"], r["seq"], r["count"]) for r in records] == [("a", 1, 3)]
    assert records[0]["first_ts"] == 1.0  # events without ts take processing time


def test_binary_predictions_match_sklearn() -> None:
    """Binary window metrics equal sklearn's on the concatenated prediction batches."""
    rng = np.random.default_rng(2)
    monitor = Monitor(MonitorSettings(window=300, time_windows=()))
    yt_all, yp_all = [], []
    for i in range(5):
        yt = rng.integers(0, 2, 80)
        yp = np.where(rng.random(80) < 0.8, yt, 1 - yt)
        yt_all.append(yt)
        yp_all.append(yp)
        monitor.ingest(
            [
                ev(
                    type="prediction",
                    run_id="r",
                    ts=float(i),
                    task="binary",
                    y_true=yt.tolist(),
                    y_pred=yp.tolist(),
                )
            ],
            now=10.0,
        )
    rec = wire(monitor.due(10.0))[0]
    yt, yp = np.concatenate(yt_all)[-300:], np.concatenate(yp_all)[-300:]
    m = rec["metrics"]
    assert rec["stream"] == "prediction/val" and rec["task"] == "binary"
    assert m["precision"] == pytest.approx(skm.precision_score(yt, yp, zero_division=0))
    assert m["recall"] == pytest.approx(skm.recall_score(yt, yp, zero_division=0))
    assert m["f1"] == pytest.approx(skm.f1_score(yt, yp, zero_division=0))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(yt, yp))
    tn, fp, fn, tp = skm.confusion_matrix(yt, yp, labels=[0, 1]).ravel()
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (tp, fp, fn, tn)


def test_multiclass_and_regression_match_sklearn(
    summary_validator: jsonschema.Draft202012Validator,
) -> None:
    """Multiclass and regression streams of one run match sklearn/scipy, each on its own split."""
    rng = np.random.default_rng(3)
    monitor = Monitor(MonitorSettings(window=1000, time_windows=(), threshold=0.25))
    yt = rng.integers(0, 4, 200)
    yp = np.where(rng.random(200) < 0.6, yt, rng.integers(0, 5, 200))
    rt = rng.normal(size=150)
    rp = rt + rng.normal(0, 0.3, 150)
    monitor.ingest(
        [
            ev(
                type="prediction",
                run_id="r",
                task="multiclass",
                split="val",
                y_true=yt.tolist(),
                y_pred=yp.tolist(),
            ),
            ev(
                type="prediction",
                run_id="r",
                task="regression",
                split="test",
                y_true=rt.tolist(),
                y_pred=rp.tolist(),
            ),
        ],
        now=5.0,
    )
    records = wire(monitor.due(5.0))
    for r in records:
        summary_validator.validate(r)
    mc = by_window(records, "r", "prediction/val")["count"]["metrics"]
    assert mc["accuracy"] == pytest.approx(skm.accuracy_score(yt, yp))
    assert mc["f1_macro"] == pytest.approx(skm.f1_score(yt, yp, average="macro", zero_division=0))
    assert mc["f1_micro"] == pytest.approx(skm.f1_score(yt, yp, average="micro", zero_division=0))
    assert mc["f1_weighted"] == pytest.approx(
        skm.f1_score(yt, yp, average="weighted", zero_division=0)
    )
    assert mc["labels"] == sorted(set(yt.tolist()) | set(yp.tolist()))
    assert mc["confusion_matrix"] == skm.confusion_matrix(yt, yp, labels=mc["labels"]).tolist()
    rg = by_window(records, "r", "prediction/test")["count"]["metrics"]
    assert rg["mse"] == pytest.approx(skm.mean_squared_error(rt, rp))
    assert rg["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(rt, rp)))
    assert rg["mae"] == pytest.approx(skm.mean_absolute_error(rt, rp))
    assert rg["r2"] == pytest.approx(skm.r2_score(rt, rp))
    assert rg["pearson_r"] == pytest.approx(sps.pearsonr(rt, rp).statistic)
    assert rg["within_threshold"] == pytest.approx(np.mean(np.abs(rt - rp) <= 0.25))


def test_undefined_statistics_are_null_on_the_wire() -> None:
    """A constant window has null skewness and kurtosis in JSON, never NaN."""
    monitor = Monitor(MonitorSettings(window=10, time_windows=()))
    monitor.ingest([ev(type="batch_time", run_id="r", seconds=[0.5, 0.5, 0.5])], now=1.0)
    raw = encode(monitor.due(1.0)[0])
    assert b"NaN" not in raw
    m = orjson.loads(raw)["metrics"]
    assert m["std"] == 0.0 and m["skewness"] is None and m["kurtosis"] is None


def test_run_end_emits_final_summaries_and_frees_the_run() -> None:
    """run_end publishes every stream of the run with final=true and forgets the run."""
    monitor = Monitor(MonitorSettings(window=10, time_windows=()))
    monitor.ingest(
        [
            ev(type="batch_time", run_id="r", seconds=0.1),
            ev(type="prediction", run_id="r", task="binary", y_true=[0, 1], y_pred=[0, 1]),
            ev(type="batch_time", run_id="other", seconds=0.1),
        ],
        now=1.0,
    )
    monitor.due(1.0)
    monitor.ingest([ev(type="run_end", run_id="r")], now=2.0)
    assert monitor.runs_tracked == 1
    records = monitor.due(2.0)
    assert {(r["stream"], r["final"], r["seq"]) for r in records} == {
        ("batch_time", True, 1),
        ("prediction/val", True, 1),
    }
    # The run id can start again from empty.
    monitor.ingest([ev(type="batch_time", run_id="r", seconds=0.3)], now=3.0)
    again = monitor.due(3.0)
    assert [(r["count"], r["total"], r["seq"]) for r in again] == [(1, 1, 0)]


def test_run_end_in_the_middle_of_a_batch_covers_what_came_before() -> None:
    """Events before a run_end in the same batch are in its final summary; later ones start anew."""
    monitor = Monitor(MonitorSettings(window=10, time_windows=()))
    monitor.ingest(
        [
            ev(type="batch_time", run_id="r", seconds=1.0),
            ev(type="batch_time", run_id="r", seconds=3.0),
            ev(type="run_end", run_id="r"),
            ev(type="batch_time", run_id="r", seconds=7.0),
        ],
        now=1.0,
    )
    records = monitor.due(1.0)
    final = [r for r in records if r["final"]]
    fresh = [r for r in records if not r["final"]]
    assert [r["metrics"]["mean"] for r in final] == [2.0]
    assert [r["metrics"]["mean"] for r in fresh] == [7.0]


def test_release_partitions_publishes_pending_data_and_forgets_those_runs() -> None:
    """Losing a partition flushes its runs' unpublished data and drops only their state."""
    monitor = Monitor(MonitorSettings(window=10, time_windows=()))
    monitor.ingest([ev(type="batch_time", run_id="p0", seconds=1.0)], now=1.0, partition=0)
    monitor.ingest([ev(type="batch_time", run_id="p1", seconds=1.0)], now=1.0, partition=1)
    released = monitor.release_partitions([0], now=2.0)
    assert [r["run_id"] for r in released] == ["p0"]
    assert monitor.runs_tracked == 1
    assert [r["run_id"] for r in monitor.due(2.0)] == ["p1"]


def test_task_change_restarts_the_stream_window() -> None:
    """A prediction stream that switches task starts a new window for the new task."""
    monitor = Monitor(MonitorSettings(window=10, time_windows=()))
    monitor.ingest(
        [ev(type="prediction", run_id="r", task="binary", y_true=[0, 1], y_pred=[1, 1])], now=1.0
    )
    monitor.ingest(
        [ev(type="prediction", run_id="r", task="regression", y_true=[0.5], y_pred=[0.5])], now=1.0
    )
    records = monitor.due(1.0)
    assert [(r["task"], r["count"]) for r in records] == [("regression", 1)]
    assert monitor.rows_tracked == 1


def test_cv_attention_and_features_streams(
    summary_validator: jsonschema.Draft202012Validator,
) -> None:
    """The cv, attention and features streams summarise their per-event figures."""
    rng = np.random.default_rng(4)
    monitor = Monitor(MonitorSettings(window=100, time_windows=()))
    folds = [
        ev(type="cv_fold", run_id="r", fold=f, train_loss=0.2 + f / 10, val_loss=0.3 + f / 10)
        for f in range(3)
    ]
    folds.append(ev(type="cv_fold", run_id="r", fold=0, train_loss=0.5, val_loss=0.9))  # re-sent
    mats = [rng.random((2, 6)) for _ in range(3)]
    vecs = [rng.normal(size=8) for _ in range(4)]
    monitor.ingest(
        [
            *folds,
            *(ev(type="attention", run_id="r", weights=m.tolist()) for m in mats),
            ev(type="features", run_id="r", values=[v.tolist() for v in vecs]),
        ],
        now=1.0,
    )
    records = wire(monitor.due(1.0))
    for r in records:
        summary_validator.validate(r)
    cv = by_window(records, "r", "cv")["count"]["metrics"]
    train, val = np.array([0.5, 0.3, 0.4]), np.array([0.9, 0.4, 0.5])
    assert cv["folds"] == 3
    assert cv["mean_train_loss"] == pytest.approx(train.mean())
    assert cv["val_loss_ci_95"] == pytest.approx(1.96 * val.std() / np.sqrt(3))
    att = by_window(records, "r", "attention")["count"]["metrics"]
    conc = [m.mean(axis=0).max() for m in mats]
    assert att["concentration"]["count"] == 3
    assert att["concentration"]["mean"] == pytest.approx(np.mean(conc))
    p = mats[-1].mean(axis=0)
    assert att["latest"]["attention_concentration"] == pytest.approx(p.max())
    assert att["latest"]["top_attention_positions"] == np.argsort(-p, kind="stable")[:5].tolist()
    feat = by_window(records, "r", "features")["count"]["metrics"]
    assert feat["l2_norm"]["count"] == 4
    assert feat["l2_norm"]["max"] == pytest.approx(max(np.linalg.norm(v) for v in vecs))
    assert feat["mean"]["mean"] == pytest.approx(np.mean([v.mean() for v in vecs]))


def test_profiler_times_the_statistics() -> None:
    """Ingest and each stream kind's statistics are recorded by the profiler."""
    profiler = Profiler()
    monitor = Monitor(MonitorSettings(window=10, time_windows=()), profiler)
    monitor.ingest(
        [
            ev(type="batch_time", run_id="r", seconds=0.1),
            ev(type="prediction", run_id="r", task="binary", y_true=[0], y_pred=[0]),
        ],
        now=1.0,
    )
    monitor.due(1.0)
    names = {op["name"] for op in profiler.report(1.0)["operations"]}
    assert {"ingest", "batch_time_stats", "binary_stats"} <= names


def test_many_runs_in_one_vectorised_pass_match_per_run_oracles() -> None:
    """With hundreds of runs of different lengths, every run's summary matches its own oracle."""
    rng = np.random.default_rng(5)
    monitor = Monitor(MonitorSettings(window=50, time_windows=()))
    data = {f"run{i}": rng.normal(10, 2, int(rng.integers(1, 120))) for i in range(300)}
    events = [
        ev(type="batch_time", run_id=run, seconds=float(v)) for run, vs in data.items() for v in vs
    ]
    rng.shuffle(events)  # type: ignore[arg-type]
    monitor.ingest(events, now=1.0)
    records = wire(monitor.due(1.0))
    assert len(records) == 300
    for rec in records:
        vs = data[rec["run_id"]]
        assert rec["total"] == len(vs)
        assert rec["count"] == min(len(vs), 50)
        # Order within the batch was shuffled, so compare only order-free facts of the window.
        if len(vs) <= 50:
            assert rec["metrics"]["mean"] == pytest.approx(vs.mean(), rel=1e-12)
            assert rec["metrics"]["p95"] == pytest.approx(np.percentile(vs, 95), rel=1e-12)


# -- bounded memory: max_runs, idle_timeout, MAX_SPLITS ------------------------------------------


def bt(run: str, *seconds: float) -> Any:
    """A batch_time event of ``run`` without event time."""
    return ev(type="batch_time", run_id=run, seconds=list(seconds))


def test_capacity_eviction_emits_final_summaries_of_the_least_recently_active_run() -> None:
    """A new run beyond max_runs evicts the least recently active run, all of its streams final."""
    monitor = Monitor(MonitorSettings(window=10, time_windows=(), max_runs=2))
    monitor.ingest(
        [
            bt("a", 1.0),
            bt("b", 2.0),
            ev(type="cv_fold", run_id="b", fold=0, train_loss=1.0, val_loss=2.0),
        ],
        now=1.0,
    )
    monitor.due(1.0)
    monitor.ingest([bt("a", 3.0)], now=2.0)  # a is now more recent than b
    monitor.ingest([bt("c", 4.0)], now=3.0)
    assert monitor.runs_tracked == 2
    assert monitor.runs_evicted == {"idle": 0, "capacity": 1}
    records = monitor.due(3.0)
    finals = sorted((r["run_id"], r["stream"], r["seq"], r["total"]) for r in records if r["final"])
    assert finals == [("b", "batch_time", 1, 1), ("b", "cv", 1, 1)]  # not dirty, still final
    assert sorted((r["run_id"], r["final"]) for r in records if not r["final"]) == [
        ("a", False),
        ("c", False),
    ]


def test_idle_runs_are_evicted_by_due_after_idle_timeout() -> None:
    """due(now) evicts exactly the runs whose last ingest is more than idle_timeout before now."""
    monitor = Monitor(MonitorSettings(window=10, time_windows=(), idle_timeout=10.0))
    monitor.ingest([bt("a", 1.0)], now=0.0)
    monitor.ingest([bt("b", 1.0)], now=5.0)
    assert {r["run_id"] for r in monitor.due(5.0)} == {"a", "b"}
    assert monitor.due(10.0) == []  # a is idle for exactly 10 s: not longer
    records = monitor.due(10.5)
    assert [(r["run_id"], r["final"], r["seq"]) for r in records] == [("a", True, 1)]
    assert monitor.runs_tracked == 1 and monitor.runs_evicted == {"idle": 1, "capacity": 0}
    monitor.ingest([bt("b", 2.0)], now=12.0)  # activity restarts b's clock
    assert [r["final"] for r in monitor.due(21.0)] == [False]
    assert [(r["run_id"], r["final"]) for r in monitor.due(22.5)] == [("b", True)]
    assert monitor.runs_tracked == 0 and monitor.runs_evicted == {"idle": 2, "capacity": 0}


def test_idle_timeout_zero_never_evicts() -> None:
    """With idle_timeout 0 a run stays however long it is idle."""
    monitor = Monitor(MonitorSettings(window=10, time_windows=(), idle_timeout=0))
    monitor.ingest([bt("a", 1.0)], now=0.0)
    monitor.due(0.0)
    assert monitor.due(1e12) == [] and monitor.runs_tracked == 1


def test_an_evicted_run_that_comes_back_starts_empty() -> None:
    """After eviction a run id starts a new window: count, total and seq from zero."""
    monitor = Monitor(MonitorSettings(window=10, time_windows=(), max_runs=1))
    monitor.ingest([bt("a", 1.0, 2.0, 3.0)], now=1.0)
    monitor.ingest([bt("b", 5.0)], now=2.0)  # evicts a
    monitor.ingest([bt("a", 7.0)], now=3.0)  # evicts b; a comes back
    records = monitor.due(3.0)
    assert [(r["run_id"], r["final"], r["total"]) for r in records if r["final"]] == [
        ("a", True, 3),
        ("b", True, 1),
    ]
    fresh = [r for r in records if not r["final"]]
    assert [(r["run_id"], r["count"], r["total"], r["seq"]) for r in fresh] == [("a", 1, 1, 0)]
    assert fresh[0]["metrics"]["mean"] == 7.0
    assert monitor.runs_evicted == {"idle": 0, "capacity": 2}


def test_a_batch_with_more_runs_than_max_runs_summarises_each_value_once() -> None:
    """However many new runs one batch brings, every value is in exactly one summary and at most
    max_runs runs (and bank rows) remain."""
    monitor = Monitor(MonitorSettings(window=10, time_windows=(), max_runs=5))
    monitor.ingest([bt(f"old{i}", 1.0) for i in range(5)], now=1.0)
    monitor.due(1.0)
    monitor.ingest([bt(f"new{i}", float(i)) for i in range(12)], now=2.0)
    records = monitor.due(2.0)
    assert monitor.runs_tracked == 5 and monitor.runs_evicted["capacity"] == 12
    new = [r for r in records if r["run_id"].startswith("new")]
    assert sorted(r["run_id"] for r in new) == sorted(f"new{i}" for i in range(12))
    assert all(r["total"] == 1 for r in new)
    assert {r["run_id"] for r in records if r["run_id"].startswith("old")} == {
        f"old{i}" for i in range(5)
    }
    # max_runs rows plus the reserve (ceil(5 / 8) = 1) for rows retired since the last due.
    assert monitor._kind["batch_time"].bank.capacity <= 5 + 1


def test_banks_stay_within_max_runs_rows_while_runs_pass_through() -> None:
    """Thousands of distinct runs through max_runs=20, in batches of 10 runs, evict one run per
    new run and leave every bank at most 20 rows wide plus the reserve for retired rows
    (ceil(20 / 8) = 3): finals of evicted runs are computed at the tick, not one run at a time."""
    monitor = Monitor(MonitorSettings(window=8, time_windows=(), max_runs=20))
    for start in range(0, 2000, 10):
        monitor.ingest(
            [
                event
                for i in range(start, start + 10)
                for event in (
                    bt(f"r{i}", 0.1),
                    ev(type="prediction", run_id=f"r{i}", task="binary", y_true=[1], y_pred=[0]),
                    ev(type="features", run_id=f"r{i}", values=[1.0, 2.0]),
                )
            ],
            now=float(start),
        )
        monitor.due(float(start))
    assert monitor.runs_tracked == 20 and monitor.runs_evicted["capacity"] == 1980
    assert (
        monitor._kind["batch_time"].bank.capacity
        == monitor._kind["features"].bank.capacity
        == 20 + 3
    )
    assert monitor.retire_passes > 0  # 10 evictions per batch fill the reserve of 3
    # Prediction banks may hold MAX_SPLITS rows per run; doubling stops at twice the rows used.
    assert monitor._kind["binary"].bank.capacity <= 2 * 20
    assert monitor.events_ingested == 6000


def test_a_run_keeps_at_most_max_splits_prediction_streams() -> None:
    """A new split beyond MAX_SPLITS closes the run's oldest prediction stream with a final
    summary; its other streams are untouched."""
    monitor = Monitor(MonitorSettings(window=10, time_windows=()))
    preds = [
        ev(type="prediction", run_id="r", task="binary", split=f"s{i}", y_true=[1], y_pred=[1])
        for i in range(MAX_SPLITS + 1)
    ]
    monitor.ingest([bt("r", 1.0), *preds[:MAX_SPLITS]], now=1.0)
    monitor.due(1.0)
    monitor.ingest([preds[MAX_SPLITS]], now=2.0)
    records = monitor.due(2.0)
    assert [(r["stream"], r["final"]) for r in records] == [
        ("prediction/s0", True),
        (f"prediction/s{MAX_SPLITS}", False),
    ]
    assert monitor.streams_evicted == 1 and monitor.rows_tracked == MAX_SPLITS + 1
    assert monitor.runs_evicted == {"idle": 0, "capacity": 0}


def test_a_restored_run_counts_as_active_from_the_next_call() -> None:
    """A run rebuilt from the changelog is not idle-evicted for the time before its restore."""
    source = Monitor(MonitorSettings(window=10, time_windows=()), track_changes=True)
    source.ingest([bt("r", 1.0)], now=0.0)
    (partition, state), *_ = source.state_changes()[0]
    monitor = Monitor(MonitorSettings(window=10, time_windows=(), idle_timeout=10.0))
    monitor.restore(state, partition)
    assert monitor.due(1000.0) == []
    assert [(r["run_id"], r["final"], r["total"]) for r in monitor.due(1010.5)] == [("r", True, 1)]


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False) | st.none(), min_size=1, max_size=40),
    window=st.integers(1, 30),
)
def test_scalar_windows_match_scipy_over_the_finite_values(
    values: list[float | None], window: int
) -> None:
    """A scalar's window: batch_time's statistics over its finite values (scipy/numpy oracles)
    and non_finite = the nulls (NaN/inf losses) in the window; schema-valid on the wire."""
    schema = json.loads((SCHEMAS / "summary.schema.json").read_text())
    monitor = Monitor(MonitorSettings(window=window, time_windows=()))
    monitor.ingest([ev(type="scalar", run_id="r", name="train/loss", value=values)], now=1.0)
    (rec,) = monitor.due(1.0)
    jsonschema.Draft202012Validator(schema).validate(orjson.loads(encode(rec)))
    assert rec["stream"] == "scalar/train/loss" and rec["total"] == len(values)
    last = values[-window:]
    finite = np.array([v for v in last if v is not None], dtype=np.float64)
    m = rec["metrics"]
    assert m["non_finite"] == len(last) - len(finite) and m["count"] == len(finite)
    if len(finite) == 0:
        assert np.isnan(m["mean"]) and np.isnan(m["p99"])
        return
    assert m["mean"] == pytest.approx(np.mean(finite), rel=1e-9, abs=1e-9)
    assert m["std"] == pytest.approx(np.std(finite), rel=1e-9, abs=1e-6)
    assert (m["min"], m["max"]) == (finite.min(), finite.max())
    assert m["p95"] == pytest.approx(np.percentile(finite, 95), rel=1e-12, abs=1e-9)
    if np.std(finite) > 1e-3:
        assert m["skewness"] == pytest.approx(sps.skew(finite), rel=1e-6, abs=1e-6)


def test_scalar_names_per_run_are_bounded() -> None:
    """A run with more than MAX_SCALARS names: the oldest name's stream is closed with a final
    summary (like prediction splits), so memory stays bounded whatever a job logs."""
    from metricsd.monitor import MAX_SCALARS

    monitor = Monitor(MonitorSettings(window=4, time_windows=()))
    events = [ev(type="scalar", run_id="r", name=f"m{i}", value=float(i)) for i in range(70)]
    monitor.ingest(events, now=1.0)
    records = monitor.due(1.0)
    finals = [r for r in records if r["final"]]
    assert len(finals) == 70 - MAX_SCALARS
    assert [r["stream"] for r in finals] == [f"scalar/m{i}" for i in range(70 - MAX_SCALARS)]
    assert monitor.streams_evicted == 70 - MAX_SCALARS
    assert {r["stream"] for r in records if not r["final"]} == {
        f"scalar/m{i}" for i in range(70 - MAX_SCALARS, 70)
    }


def test_an_event_time_far_in_the_future_is_replaced_by_processing_time() -> None:
    """ts=1e300 (or milliseconds as seconds) would empty the run's time windows for good: more
    than MAX_FUTURE ahead of now, processing time stands in and the event is counted."""
    from metricsd.monitor import MAX_FUTURE

    monitor = Monitor(MonitorSettings(window=10, time_windows=(60.0,)))
    now = 1_764_000_000.0
    events = [ev(type="batch_time", run_id="r", ts=now - 1, seconds=1.0),
              ev(type="batch_time", run_id="r", ts=1e300, seconds=2.0),
              ev(type="batch_time", run_id="r", ts=now * 1000, seconds=3.0),
              ev(type="batch_time", run_id="r", ts=now + MAX_FUTURE - 1, seconds=4.0)]  # fmt: skip
    monitor.ingest(events, now=now)
    assert monitor.future_ts_clamped == 2
    windows = by_window(monitor.due(now), "r", "batch_time")
    assert windows["count"]["last_ts"] == now + MAX_FUTURE - 1
    assert windows["time:60"]["count"] == 1  # only the value at the newest (legal) time
    monitor.ingest([ev(type="batch_time", run_id="r", ts=1e300, seconds=5.0)], now=now + 10)
    later = by_window(monitor.due(now + 10), "r", "batch_time")
    assert later["count"]["count"] == 5
