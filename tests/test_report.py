"""metricsd report: PNG figures and one HTML page from summaries the pure Monitor produced."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from metricsd.config import MonitorSettings
from metricsd.events import Decoder
from metricsd.monitor import Monitor
from metricsd.records import encode
from metricsd.simulate import TrainingJob

matplotlib = pytest.importorskip("matplotlib")

TICK = 5.0  # seconds of simulated time between due() calls
STEP = 0.25  # seconds of simulated time per training step


def simulated_records(
    runs: dict[str, str | None] | None = None, *, steps: int = 2000, seed: int = 7
) -> list[dict[str, Any]]:
    """Summaries as a consumer of the output topic sees them, from simulated training runs.

    ``runs`` maps run id -> task (``binary``, ``multiclass``, ``regression``), or None for a run
    that sends only batch_time events. Every run ends (``run_end``) after ``steps`` steps.
    """
    runs = runs or {"alpha": "binary", "beta": "regression", "gamma": "multiclass"}
    decoder = Decoder()
    monitor = Monitor(MonitorSettings(window=200, time_windows=(60.0,)))
    rng = np.random.default_rng(seed)
    jobs = {}
    for run_id, task in runs.items():
        job = TrainingJob(run_id, np.random.default_rng(rng.integers(2**32)), steps=steps)
        job.task = task or "binary"
        jobs[run_id] = job
    start, now, next_tick = 1_764_000_000.0, 1_764_000_000.0, 1_764_000_000.0 + TICK
    out: list[dict[str, Any]] = []
    while any(not job.done for job in jobs.values()):
        batch = []
        for run_id, job in jobs.items():
            if job.done:
                continue
            for doc in job.events(now):
                if runs[run_id] is None and doc["type"] not in ("batch_time", "run_end"):
                    continue
                batch.append(decoder.decode(run_id.encode(), orjson.dumps(doc)))
        monitor.ingest(batch, now)
        now += STEP
        if now >= next_tick:
            out.extend(monitor.due(now))
            next_tick += TICK
    out.extend(monitor.due(now))
    assert now > start
    return [orjson.loads(encode(r)) for r in out]


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    """Four simulated runs: binary, regression, multiclass, and one with only batch times."""
    return simulated_records(
        {"alpha": "binary", "beta": "regression", "gamma": "multiclass", "solo": None},
        steps=1200,
    )


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def png_pixels(path: Path) -> Any:
    from matplotlib import image

    return image.imread(path)


def distinct_hues(pixels: Any) -> int:
    """Hues (12 bins of 30°) that at least 200 clearly coloured pixels have; greys, black text
    and anti-aliasing count for nothing."""
    from matplotlib.colors import rgb_to_hsv

    hsv = rgb_to_hsv(pixels[..., :3]).reshape(-1, 3)
    coloured = hsv[(hsv[:, 1] > 0.35) & (hsv[:, 2] > 0.25)]
    bins = np.bincount((coloured[:, 0] * 12).astype(np.int64) % 12, minlength=12)
    return int((bins >= 200).sum())


def axes_with_data(fig: Any) -> list[bool]:
    """Per axes of a figure: whether it holds any line with a finite point or a filled area."""
    out = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        lines = [
            ln for ln in ax.get_lines() if np.isfinite(np.asarray(ln.get_ydata(), float)).any()
        ]
        out.append(bool(lines or ax.collections or ax.patches))
    return out


EVERY_FIGURE = {
    "step_time",
    "step_time_distribution",
    "throughput",
    "quality_val",
    "cv",
    "attention",
    "features",
    "scalars",
}


@pytest.mark.parametrize("run", ["alpha", "beta", "gamma"])
def test_report_writes_every_figure_and_an_html_page_that_embeds_them(
    run: str, records: list[dict[str, Any]], tmp_path: Path
) -> None:
    """A run with every stream gets all eight PNGs (sane size, at least two hues) and a page
    embedding each one, with its headline numbers."""
    from metricsd import report

    source = write_jsonl(tmp_path / "summaries.jsonl", records)
    out = tmp_path / "out"
    assert report.main(["--run", run, "--input", str(source), "--out", str(out)]) == 0
    pngs = {p.stem: p for p in out.glob("*.png")}
    assert set(pngs) == EVERY_FIGURE
    page = (out / "index.html").read_text()
    for name, path in pngs.items():
        pixels = png_pixels(path)
        height, width = pixels.shape[:2]
        assert 600 <= width <= 1600 and 250 <= height <= 1200, (name, width, height)
        assert distinct_hues(pixels) >= 2, name
        assert base64.b64encode(path.read_bytes()).decode() in page, name
        assert f'data-file="{path.name}"' in page
    assert f"Run {run}" in page and "ended" in page
    assert "p95" in page and "steps/s" in page


def test_headline_figures_are_the_latest_count_window_values(
    records: list[dict[str, Any]],
) -> None:
    """The page's numbers are those of the last count-window summary of each stream."""
    from metricsd import report
    from metricsd.summaries import Summaries

    summaries = Summaries(run="beta")
    summaries.extend(records)
    rows = {(s, f): v for s, f, v in report.headline(summaries, "beta")}
    last = [
        r
        for r in records
        if r["run_id"] == "beta"
        and r["stream"] == "prediction/val"
        and r["window"]["kind"] == "count"
    ][-1]
    assert last["final"] is True
    assert rows[("prediction/val", "rmse")] == f"{last['metrics']['rmse']:.3f}"
    assert rows[("run", "state")] == "ended"
    assert rows[("run", "batches seen")] == "1200"


def test_a_run_with_only_batch_times_gets_no_empty_figures(
    records: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Missing streams are absent: only the three batch-time figures, each axis holding data."""
    from metricsd import report
    from metricsd.summaries import Summaries

    summaries = Summaries(run="solo")
    summaries.extend(records)
    assert summaries.streams("solo") == ["batch_time"]
    figures = report.build_figures(summaries, "solo")
    assert set(figures) == {"step_time", "step_time_distribution", "throughput"}
    for name, fig in figures.items():
        assert all(axes_with_data(fig)), name
    written = report.write_report(summaries, "solo", tmp_path)
    assert sorted(p.name for p in written) == [
        "index.html",
        "step_time.png",
        "step_time_distribution.png",
        "throughput.png",
    ]
    page = (tmp_path / "index.html").read_text()
    figures_on_page = set(re.findall(r'<figure id="([^"]+)"', page))
    assert figures_on_page == {"step_time", "step_time_distribution", "throughput"}
    streams_in_table = set(re.findall(r"<tr><td>([^<]+)</td>", page))
    assert streams_in_table == {"run", "batch_time"}


def test_every_figure_of_a_full_run_has_data_on_every_axis(records: list[dict[str, Any]]) -> None:
    """No figure carries an empty axis (a stream with data is drawn, one without is absent)."""
    from metricsd import report
    from metricsd.summaries import Summaries

    summaries = Summaries()
    summaries.extend(records)
    for run in ("alpha", "beta", "gamma"):
        figures = report.build_figures(summaries, run)
        assert set(figures) == EVERY_FIGURE
        for name, fig in figures.items():
            flags = axes_with_data(fig)
            assert flags and all(flags), (run, name)


def test_duplicates_in_the_input_file_are_dropped_and_the_last_copy_wins(
    records: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Summaries published twice count once; a later copy of an id replaces the earlier one."""
    from metricsd import report

    alpha = [r for r in records if r["run_id"] == "alpha"]
    later = {**alpha[0], "total": alpha[0]["total"] + 5}
    source = write_jsonl(tmp_path / "dup.jsonl", [*alpha, *alpha[:10], later, {"type": "x"}])
    summaries = report.load_file(source, "alpha")
    assert len(summaries) == len(alpha)
    assert summaries.duplicates == 10 and summaries.replaced == 1
    first = summaries.series("alpha", alpha[0]["stream"], "count:200")[0]
    assert first["id"] == alpha[0]["id"] and first["total"] == alpha[0]["total"] + 5


def test_a_run_without_summaries_exits_1_with_a_page_saying_so(
    records: list[dict[str, Any]], tmp_path: Path
) -> None:
    """An unknown run id: exit code 1, no PNG, and an HTML page that says nothing was found."""
    from metricsd import report

    source = write_jsonl(tmp_path / "s.jsonl", records[:50])
    assert report.main(["--run", "nope", "--input", str(source), "--out", str(tmp_path)]) == 1
    assert not list(tmp_path.glob("*.png"))
    assert "No summaries of this run" in (tmp_path / "index.html").read_text()


def distributed_records(*, ticks: int = 12, nan_ticks: tuple[int, ...] = (4,)) -> list[Any]:
    """Summaries of run "dist": 8 ranks (rank 5 three times slower) and scalars loss (a null now
    and then), lr and emitter/dropped, as a consumer sees them."""
    decoder = Decoder()
    monitor = Monitor(MonitorSettings(window=100, time_windows=()))
    rng = np.random.default_rng(2)
    out = []
    for tick in range(ticks):
        now = 1_764_000_000.0 + 5 * tick
        docs: list[dict[str, Any]] = [
            {"type": "batch_time", "run_id": "dist", "rank": r, "ts": now,
             "seconds": (rng.lognormal(-2.5, 0.1, 10) * (3 if r == 5 else 1)).tolist()}
            for r in range(8)
        ]  # fmt: skip
        loss: list[float | None] = (np.exp(-tick / 5) + rng.normal(0, 0.01, 10)).tolist()
        if tick in nan_ticks:
            loss[2] = None
        for name, value in (("lr", 1e-3), ("emitter/dropped", 0.0), ("loss", loss)):
            docs.append(
                {"type": "scalar", "run_id": "dist", "name": name, "ts": now, "value": value}
            )
        monitor.ingest([decoder.decode(None, orjson.dumps(d)) for d in docs], now)
        out.extend(monitor.due(now))
    return [orjson.loads(encode(r)) for r in out]


def test_scalar_figure_one_panel_per_name_loss_first_non_finite_marked() -> None:
    """scalars: a panel per name (loss first, the emitter's own last), each with the window
    means as its line; the loss panel marks exactly the summaries whose window held a null."""
    from metricsd import report
    from metricsd.summaries import Summaries

    records = distributed_records()
    summaries = Summaries(run="dist")
    summaries.extend(records)
    fig = report.build_figures(summaries, "dist")["scalars"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "lr", "emitter/dropped"]
    assert all(axes_with_data(fig))
    loss = [r for r in records if r["stream"] == "scalar/loss"]
    mean_line, *marks = fig.axes[0].get_lines()
    np.testing.assert_allclose(mean_line.get_ydata(), [r["metrics"]["mean"] for r in loss])
    assert len(marks) == 1
    marked = sum(r["metrics"]["non_finite"] > 0 for r in loss)
    assert marked == len(loss) - 4 and len(marks[0].get_xdata()) == marked  # from tick 4 on
    assert all(len(ax.get_lines()) == 1 for ax in fig.axes[1:])  # no non-finite there


def test_ranks_figure_bars_are_the_latest_medians_stragglers_in_red(tmp_path: Path) -> None:
    """ranks: one bar per rank of the latest ranks summary, height = its median (ms), red bars
    exactly the summary's stragglers; written as ranks.png; a run without ranks has none."""
    from matplotlib.colors import to_rgba
    from metricsd import report
    from metricsd.summaries import Summaries

    summaries = Summaries()
    summaries.extend(distributed_records())
    latest = summaries.latest("dist", "ranks")
    assert latest is not None and latest["metrics"]["stragglers"] == [5]
    fig = report.build_figures(summaries, "dist")["ranks"]
    (ax,) = fig.axes
    bars = sorted(ax.patches, key=lambda p: p.get_x())
    medians = {s["rank"]: s["median"] for s in latest["metrics"]["slowest"]}
    np.testing.assert_allclose([b.get_height() for b in bars],
                               [medians[r] * 1000 for r in range(8)])  # fmt: skip
    red = [i for i, b in enumerate(bars) if b.get_facecolor() == to_rgba("tab:red")]
    assert red == [5]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(r) for r in range(8)]
    written = {p.name for p in report.write_report(summaries, "dist", tmp_path)}
    assert {"ranks.png", "scalars.png"} <= written
    assert distinct_hues(png_pixels(tmp_path / "ranks.png")) >= 2
    assert "ranks" not in report.build_figures(summaries, "nope")


def test_straggler_z_figure_follows_the_ranks_summaries(tmp_path: Path) -> None:
    """ranks_z: the slowest rank's z of every ranks summary as one line, the threshold as a
    dashed line, red marks exactly at the summaries with stragglers; the page embeds it."""
    from metricsd import report
    from metricsd.summaries import Summaries

    records = distributed_records()
    summaries = Summaries()
    summaries.extend(records)
    ranks = [r for r in records if r["stream"] == "ranks"]
    fig = report.build_figures(summaries, "dist")["ranks_z"]
    (ax,) = fig.axes
    line, threshold, marks = ax.get_lines()
    np.testing.assert_allclose(line.get_ydata(), [r["metrics"]["max_z"] for r in ranks])
    assert list(threshold.get_ydata()) == [3.5, 3.5]
    assert len(marks.get_xdata()) == sum(r["metrics"]["straggler_count"] > 0 for r in ranks)
    assert "robust z" in ax.get_ylabel()
    report.write_report(summaries, "dist", tmp_path)
    assert distinct_hues(png_pixels(tmp_path / "ranks_z.png")) >= 2
    assert 'id="ranks_z"' in (tmp_path / "index.html").read_text()
    assert "ranks_z" not in report.build_figures(summaries, "nope")


def test_throughput_of_a_distributed_run_counts_steps_not_every_ranks_batches() -> None:
    """A run of N ranks sends N batch times per step: its observed steps/s is the batch_time
    total's rate divided by N (the ranks summary's count), and the legend says so."""
    from metricsd import report
    from metricsd.summaries import Summaries, throughput

    summaries = Summaries()
    summaries.extend(distributed_records())
    ranks = summaries.latest("dist", "ranks")
    assert ranks is not None and ranks["metrics"]["ranks"] == 8
    fig = report.build_figures(summaries, "dist")["throughput"]
    observed = fig.axes[0].get_lines()[0]
    assert "/ 8 ranks" in observed.get_label()
    rate = throughput(summaries.series("dist", "batch_time", "count:100"))
    assert rate
    np.testing.assert_allclose(observed.get_ydata(), [r / 8 for _, r in rate])
