"""Reading summaries back: parsing, de-duplication on id, the latest per window, key figures."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from metricsd.summaries import Figure, Summaries, key_figures, parse, throughput, window_tag


def summary(
    run: str = "r1",
    stream: str = "batch_time",
    seq: int = 0,
    *,
    window: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    total: int = 10,
    count: int = 10,
    first_ts: float | None = 100.0,
    last_ts: float | None = 109.0,
    emitted_at: float = 110.0,
    final: bool = False,
    task: str | None = None,
) -> dict[str, Any]:
    """A summary record as the daemon publishes it (id built the daemon's way)."""
    window = window or {"kind": "count", "size": 1000}
    record: dict[str, Any] = {
        "type": "summary",
        "schema_version": 1,
        "id": f"{run}|{stream}|{window_tag(window)}|{seq}",
        "run_id": run,
        "stream": stream,
        "window": window,
        "count": count,
        "total": total,
        "metrics": metrics if metrics is not None else {"median": 0.1},
        "seq": seq,
        "first_ts": first_ts,
        "last_ts": last_ts,
        "emitted_at": emitted_at,
        "final": final,
    }
    if task is not None:
        record["task"] = task
    return record


def test_parse_accepts_summaries_and_profiles_and_skips_everything_else() -> None:
    """Bytes, str and dicts parse; dead letters, other JSON, garbage and incomplete summaries
    give None (never an exception)."""
    rec = summary()
    assert parse(orjson.dumps(rec)) == rec
    assert parse(orjson.dumps(rec).decode()) == rec
    assert parse(rec) == rec
    profile = {"type": "profile", "instance": "h:1", "emitted_at": 5.0, "tick_ms": {}}
    assert parse(orjson.dumps(profile)) == profile
    incomplete = {k: v for k, v in rec.items() if k != "id"}
    bad_seq = {**rec, "seq": "7"}
    for raw in (
        None,
        b"",
        b"{not json",
        b"[1, 2]",
        b'"summary"',
        orjson.dumps({"type": "dead_letter", "reason": "schema"}),
        orjson.dumps(incomplete),
        orjson.dumps(bad_seq),
        orjson.dumps({"type": "profile"}),
    ):
        assert parse(raw) is None, raw


def test_window_tag_is_the_window_part_of_the_id() -> None:
    """Tags match what the daemon puts in ids: count:N and time:T with T in %g."""
    assert window_tag({"kind": "count", "size": 1000}) == "count:1000"
    assert window_tag({"kind": "time", "seconds": 60.0, "truncated": False}) == "time:60"
    assert window_tag({"kind": "time", "seconds": 2.5, "truncated": True}) == "time:2.5"


def test_an_identical_copy_is_a_duplicate_and_a_different_later_copy_wins() -> None:
    """At-least-once delivery: the same id twice counts once; a later copy that covers more
    data replaces the earlier one, in the latest view and in the series alike."""
    store = Summaries()
    first = summary(seq=3, total=10)
    assert store.add(first) is True
    assert store.add(dict(first)) is False
    assert store.duplicates == 1 and len(store) == 1
    later = summary(seq=3, total=14, count=14, emitted_at=130.0)
    assert store.add(later) is True
    assert store.replaced == 1 and len(store) == 1
    assert store.latest("r1", "batch_time") == later
    assert store.series("r1", "batch_time") == [later]
    assert store.records() == [later]


def test_latest_per_run_stream_and_window_follows_seq() -> None:
    """Each (run, stream, window) keeps its highest seq; an older seq arriving late (a replay)
    does not go back in time; windows and runs are kept apart."""
    store = Summaries()
    time60 = {"kind": "time", "seconds": 60.0, "truncated": False}
    store.extend(
        [
            summary(seq=0),
            summary(seq=1, total=20),
            summary(seq=1, window=time60, total=20),
            summary(run="r2", seq=5),
            summary(seq=0, total=10, emitted_at=500.0),  # identical to the first: duplicate
            summary(seq=0, total=11, emitted_at=501.0),  # a replayed older window
        ]
    )
    assert store.latest("r1", "batch_time")["seq"] == 1  # type: ignore[index]
    assert store.latest("r1", "batch_time", "time:60")["window"] == time60  # type: ignore[index]
    assert store.windows("r1", "batch_time") == ["count:1000", "time:60"]
    assert store.latest("r2", "batch_time")["seq"] == 5  # type: ignore[index]
    assert store.latest("r1", "cv") is None
    assert store.runs() == ["r1", "r2"]
    assert [r["seq"] for r in store.series("r1", "batch_time")] == [0, 1]


def test_after_a_final_summary_the_run_id_starts_again_from_seq_zero() -> None:
    """A run that ended (final) and comes back: its new seq 0 becomes the latest."""
    store = Summaries()
    store.extend([summary(seq=7, final=True), summary(seq=0, total=3, emitted_at=900.0)])
    latest = store.latest("r1", "batch_time")
    assert latest is not None and latest["seq"] == 0 and latest["final"] is False
    assert not store.is_final("r1")


def test_a_run_is_final_when_every_stream_published_its_final_summary() -> None:
    """is_final needs all streams final; last_emitted is the newest over the stream's windows."""
    store = Summaries()
    store.extend(
        [
            summary(seq=2, final=True, emitted_at=200.0),
            summary(stream="cv", seq=1, metrics={"mean_val_loss": 0.4}, emitted_at=150.0),
        ]
    )
    assert not store.is_final("r1")
    store.add(summary(stream="cv", seq=2, final=True, metrics={}, emitted_at=210.0))
    assert store.is_final("r1")
    assert store.last_emitted("r1", "cv") == 210.0
    assert store.streams("r1") == ["batch_time", "cv"]


def test_filters_keep_only_the_requested_run_and_stream() -> None:
    """run= and stream= drop other summaries before they are stored."""
    store = Summaries(run="r1", stream="cv")
    assert store.add(summary(run="r2", stream="cv")) is False
    assert store.add(summary(run="r1", stream="batch_time")) is False
    assert store.add(summary(run="r1", stream="cv", metrics={})) is True
    assert store.runs() == ["r1"] and store.streams("r1") == ["cv"]


def test_without_series_only_fingerprints_and_the_latest_are_kept() -> None:
    """keep_series=False (tail) still de-duplicates but keeps no history."""
    store = Summaries(keep_series=False)
    assert store.add(summary(seq=0)) and not store.add(summary(seq=0))
    assert store.add(summary(seq=1))
    assert store.series("r1", "batch_time") == []
    assert store.latest("r1", "batch_time")["seq"] == 1  # type: ignore[index]
    with pytest.raises(ValueError):
        store.records()


def values(record: dict[str, Any]) -> dict[str, float | None]:
    return {f.label: f.value for f in key_figures(record)}


def test_batch_time_figures_are_percentiles_mean_and_event_time_rate() -> None:
    """p50/p95/p99/mean from the metrics; steps/s = (count - 1) / (last_ts - first_ts)."""
    m = {"median": 0.15, "p95": 0.2, "p99": 0.4, "mean": 0.16, "std": 0.01}
    rec = summary(metrics=m, count=101, first_ts=0.0, last_ts=20.0)
    assert values(rec) == {"p50": 0.15, "p95": 0.2, "p99": 0.4, "mean": 0.16, "steps/s": 5.0}
    assert [f.text() for f in key_figures(rec)] == [
        "150.0 ms",
        "200.0 ms",
        "400.0 ms",
        "160.0 ms",
        "5.0/s",
    ]
    one = summary(metrics=m, count=1, first_ts=3.0, last_ts=3.0)
    assert values(one)["steps/s"] is None
    # a run of 4 ranks: 4 batches per step
    assert {f.label: f.value for f in key_figures(rec, ranks=4)}["steps/s"] == 1.25


@pytest.mark.parametrize(
    ("stream", "task", "metrics", "expected"),
    [
        (
            "prediction/val",
            "binary",
            {"f1": 0.8, "accuracy": 0.9, "precision": 0.7, "recall": None},
            {"f1": 0.8, "accuracy": 0.9, "precision": 0.7, "recall": None},
        ),
        (
            "prediction/test",
            "multiclass",
            {"accuracy": 0.5, "f1_macro": 0.4, "f1_weighted": 0.45, "labels": [0, 1, 2]},
            {"accuracy": 0.5, "f1 macro": 0.4, "f1 weighted": 0.45, "classes": 3.0},
        ),
        (  # reduced: sparse triples instead of the matrix, every label still listed
            "prediction/test",
            "multiclass",
            {
                "accuracy": 0.5,
                "f1_macro": 0.4,
                "f1_weighted": 0.45,
                "labels": [0, 1, 2],
                "confusion_sparse": [[0, 0, 1], [2, 1, 1]],
            },
            {"accuracy": 0.5, "f1 macro": 0.4, "f1 weighted": 0.45, "classes": 3.0},
        ),
        (  # reduced: matrix omitted, labels trimmed to the top by support; labels_total counts
            "prediction/test",
            "multiclass",
            {
                "accuracy": 0.5,
                "f1_macro": 0.4,
                "f1_weighted": 0.45,
                "labels": [0, 7],
                "support": [9, 8],
                "labels_total": 1000,
                "labels_truncated": True,
                "confusion_omitted": "too big",
            },
            {"accuracy": 0.5, "f1 macro": 0.4, "f1 weighted": 0.45, "classes": 1000.0},
        ),
        (
            "prediction/val",
            "regression",
            {"rmse": 1.5, "r2": 0.25, "mae": 1.0, "within_threshold": 0.1},
            {"rmse": 1.5, "r2": 0.25, "mae": 1.0, "within thr": 0.1},
        ),
        (
            "cv",
            None,
            {"mean_val_loss": 0.5, "mean_train_loss": 0.4, "overfitting_ratio": 1.25, "folds": 5},
            {"val loss": 0.5, "train loss": 0.4, "val/train": 1.25, "folds": 5.0},
        ),
        (
            "attention",
            None,
            {
                "entropy": {"mean": 2.5},
                "concentration": {"mean": 0.3},
                "latest": {"attention_entropy": 2.4},
            },
            {"entropy": 2.5, "concentration": 0.3, "latest entropy": 2.4},
        ),
        (
            "features",
            None,
            {"sparsity": {"mean": 0.6}, "l2_norm": {"mean": 4.0}, "mean": {"mean": -0.01}},
            {"sparsity": 0.6, "l2 norm": 4.0, "mean": -0.01},
        ),
        ("future_stream", None, {"x": 1}, {}),
    ],
)
def test_key_figures_per_stream_kind(
    stream: str, task: str | None, metrics: dict[str, Any], expected: dict[str, Any]
) -> None:
    """Each stream kind shows its 3-5 figures; null or absent metrics are None, not errors."""
    assert values(summary(stream=stream, task=task, metrics=metrics)) == expected


def test_figure_text_formats_units_and_undefined_values() -> None:
    """Seconds become ms below 1 s; fractions become percent; counts are whole; None is '-'."""
    assert Figure("x", None, "s").text() == "-"
    assert Figure("x", float("nan")).text() == "-"
    assert Figure("x", 2.5, "s").text() == "2.50 s"
    assert Figure("x", 0.0123, "s").text() == "12.3 ms"
    assert Figure("x", 0.5, "%").text() == "50.0%"
    assert Figure("x", 5.0, "n").text() == "5"
    assert Figure("x", 0.12345).text() == "0.123"
    assert Figure("x", 1234.4).text() == "1234"  # 4 significant digits from 100 on
    assert Figure("x", 1.5e-6).text() == "1.5e-06"


def test_throughput_is_batches_per_second_of_event_time_between_summaries() -> None:
    """Δtotal / Δlast_ts for successive summaries; no point when time or total stand still; a
    run id starting again (total drops) starts a new segment."""
    series = [
        summary(seq=0, total=10, last_ts=10.0),
        summary(seq=1, total=30, last_ts=20.0),
        summary(seq=2, total=30, last_ts=20.0),  # nothing new
        summary(seq=3, total=70, last_ts=30.0),
        summary(seq=0, total=5, last_ts=40.0),  # the run id again, from scratch
        summary(seq=1, total=25, last_ts=50.0),
        summary(seq=2, total=30, last_ts=None),  # an empty window: skipped
    ]
    assert throughput(series) == [(20.0, 2.0), (30.0, 4.0), (50.0, 2.0)]


def test_tail_table_shows_one_row_per_run_and_stream_with_figures_age_and_state() -> None:
    """The live table of ``metricsd tail``: run, stream, window, key figures, age; an ended run
    says so; the caption counts duplicates and shows the daemon's tick time."""
    from metricsd.tail import render_table
    from rich.console import Console

    store = Summaries()
    m = {"median": 0.15, "p95": 0.2, "p99": 0.4, "mean": 0.16}
    store.extend(
        [
            summary(run="alive", metrics=m, emitted_at=100.0),
            summary(run="alive", metrics=m, emitted_at=100.0),  # duplicate
            summary(
                run="alive",
                stream="prediction/val",
                task="binary",
                metrics={"f1": 0.75, "accuracy": 0.5},
                emitted_at=130.0,
            ),
            summary(run="done", seq=4, metrics=m, final=True, emitted_at=40.0),
            {"type": "profile", "instance": "host:7", "emitted_at": 1.0, "tick_ms": {"p95": 2.5}},
        ]
    )
    console = Console(record=True, width=160, color_system=None)
    console.print(render_table(store, now=160.0))
    text = console.export_text()
    lines = text.splitlines()
    alive = next(line for line in lines if line.lstrip("│ ").startswith("alive"))
    assert "batch_time" in alive and "p50 150.0 ms" in alive and "60s" in alive and "live" in alive
    val = next(line for line in lines if "prediction/val" in line)
    assert "f1 0.750" in val and "30s" in val
    done = next(line for line in lines if "done" in line)
    assert "ended" in done and "2m" in done
    assert "1 duplicates skipped" in text and "tick p95 2.5 ms" in text


def test_tail_table_gives_a_distributed_runs_steps_not_its_batches() -> None:
    """A run with a ranks summary of 4 ranks: its batch_time row's steps/s is the batch rate
    over 4; a run without one keeps the batch rate."""
    from metricsd.tail import render_table
    from rich.console import Console

    store = Summaries()
    m = {"median": 0.15, "p95": 0.2, "p99": 0.4, "mean": 0.16}
    store.extend(
        [
            summary(run="dist", metrics=m, count=101, first_ts=0.0, last_ts=20.0),
            summary(run="dist", stream="ranks", metrics={"ranks": 4, "median": 0.15}),
            summary(run="solo", metrics=m, count=101, first_ts=0.0, last_ts=20.0),
        ]
    )
    console = Console(record=True, width=200, color_system=None)
    console.print(render_table(store, now=160.0))
    lines = console.export_text().splitlines()
    dist = next(line for line in lines if line.lstrip("│ ").startswith("dist"))
    solo = next(line for line in lines if line.lstrip("│ ").startswith("solo"))
    assert "steps/s 1.2/s" in dist, dist  # 1.25, shown to one decimal
    assert "steps/s 5.0/s" in solo, solo


@pytest.mark.parametrize("as_json", [True, False])
def test_tail_off_a_terminal_prints_each_new_summary_once(as_json: bool) -> None:
    """Not on a terminal, tail writes one line per new summary (JSON with --json, else text);
    duplicates, other runs (--run) and non-summary records print nothing."""
    import io

    from metricsd import tail

    args = tail.build_parser().parse_args(["--run", "r1", *(["--json"] if as_json else [])])
    out = io.StringIO()
    feed = tail._Tail(args, out)
    first = summary(seq=0, metrics={"median": 0.25})
    feed.handle(
        [
            orjson.dumps(first),
            orjson.dumps(first),
            orjson.dumps(summary(run="r2")),
            b"garbage",
            None,
            orjson.dumps({"type": "profile", "instance": "h", "emitted_at": 1.0}),
            orjson.dumps(summary(seq=1, final=True)),
        ]
    )
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    if as_json:
        assert [orjson.loads(line) for line in lines] == [first, summary(seq=1, final=True)]
    else:
        assert lines[0].startswith("r1 batch_time count:1000 seq=0") and "p50=250.0 ms" in lines[0]
        assert "final" in lines[1]


def test_scalar_streams_show_their_figures() -> None:
    """A scalar/<name> summary (loss, learning rate) shows mean, min, max and non-finite."""
    from metricsd.summaries import key_figures, stream_kind

    record = {"stream": "scalar/loss", "metrics": {"mean": 0.5, "min": 0.1, "max": 0.9,
              "non_finite": 2, "count": 8}}  # fmt: skip
    assert stream_kind(record) == "scalar"
    figures = {f.label: f.value for f in key_figures(record)}
    assert figures == {"mean": 0.5, "min": 0.1, "max": 0.9, "non-finite": 2.0}


def _life(incarnation: str, seq: int, group: str = "g", **fields: Any) -> dict[str, Any]:
    """A summary of the current id scheme: group and incarnation in the record and the id."""
    record = summary(seq=seq, **fields)
    tag = window_tag(record["window"])
    record.update(
        group=group,
        incarnation=incarnation,
        id=f"{group}|r1|batch_time|{incarnation}|{tag}|{seq}",
    )
    return record


def test_a_later_incarnation_replaces_the_latest_and_a_replayed_older_one_does_not() -> None:
    """A run back after run_end restarts seq at 0 under a later incarnation (same partition,
    larger offset): it becomes the latest; a replayed summary of the older life arriving after
    it (a restart re-publishing) does not take over again; both lives stay in the series."""
    store = Summaries()
    old = [_life("0:5", 0), _life("0:5", 1), _life("0:5", 2, final=True)]
    new = _life("0:40", 0, total=3)
    store.extend([*old, new, _life("0:5", 1, total=11)])
    assert store.latest("r1", "batch_time") == new
    assert len(store) == 4 and store.replaced == 1
    assert [r["incarnation"] for r in store.series("r1", "batch_time")] == ["0:5"] * 3 + ["0:40"]


def test_summaries_of_another_group_are_kept_apart_by_id() -> None:
    """Two daemons of different groups publish seq 0 of the same window: two ids, nothing
    replaced, neither counted as a duplicate of the other."""
    store = Summaries()
    store.extend([_life("0:0", 0, group="one"), _life("0:0", 0, group="two", total=12)])
    assert len(store) == 2 and store.replaced == 0 and store.duplicates == 0
