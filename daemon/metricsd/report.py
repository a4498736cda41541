"""``metricsd report``: PNG figures and one self-contained HTML page for one run.

Summaries come from the output topic (read from its start, without a consumer group, up to the
end it had when reading began, or until it has been quiet for ``--idle`` seconds) or from a
JSON-lines file that ``metricsd tail --json`` saved (``--input``). They are de-duplicated on
``id`` (the last copy wins) by ``metricsd.summaries``. What is drawn, each only when its stream
has data (a missing stream is simply absent, never an empty axis):

===============================  ==========================================================
file                             content
===============================  ==========================================================
step_time.png                    batch time p50/p95/p99 and mean of the count window, over time
step_time_distribution.png       the latest window of each size: min-max, mean ± std, percentiles
throughput.png                   steps/s (Δtotal / Δevent time) and 1 / mean batch time
quality_<split>.png              per prediction stream: f1/accuracy/precision/recall
                                 (binary), accuracy and f1 (multiclass), rmse/mae and r2
                                 (regression)
cv.png                           mean train and validation loss over the folds, ± 95% CI
attention.png                    attention entropy and concentration (window mean, min-max band)
features.png                     feature sparsity and L2 norm (window mean, min-max band)
scalars.png                      one panel per scalar/<name> (loss names first, at most
                                 MAX_SCALAR_PANELS): window mean, min-max band, and a red
                                 mark with the count where the window held non-finite values
ranks.png                        per-rank median step time of the latest ranks summary (the
                                 16 slowest ranks it lists), stragglers in red, the run's
                                 median of medians as a line
ranks_z.png                      the slowest rank's robust z over time (max_z of each ranks
                                 summary), the straggler threshold, windows with stragglers
index.html                       headline numbers and every figure above, embedded as base64
===============================  ==========================================================

The time axis is event time since the run's first value. Figures are drawn with matplotlib's
object API (``matplotlib.figure.Figure``, rendered by Agg): no display, no pyplot state.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import html
import io
import logging
import math
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from metricsd import kafka
from metricsd.config import ConfigError
from metricsd.summaries import (
    Summaries,
    key_figures,
    parse,
    stream_kind,
    throughput,
    window_tag,
)
from metricsd.tail import add_connection_flags, read_records, security_from

__all__ = [
    "MAX_SCALAR_PANELS",
    "build_figures",
    "build_parser",
    "headline",
    "load_file",
    "main",
    "write_report",
]

Record = dict[str, Any]

# One colour per meaning, the same in every figure (matplotlib's tab10).
_COLOURS = {
    "median": "tab:blue",
    "p95": "tab:orange",
    "p99": "tab:red",
    "mean": "tab:green",
    "min": "tab:gray",
    "max": "tab:gray",
}
_FIGSIZE = (9.0, 4.2)
_DPI = 100
# One colour per scalar panel; red is kept for the non-finite marks.
_PANEL_COLOURS = ("tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:cyan",
                  "tab:olive", "tab:pink")  # fmt: skip
MAX_SCALAR_PANELS = 8  # panels of scalars.png; further names are left out (the title says so)


def load_file(path: Path, run: str | None = None) -> Summaries:
    """Summaries (and profiles) from a JSON-lines file; lines that are no record are skipped."""
    summaries = Summaries(run=run)
    with path.open("rb") as lines:
        summaries.extend(parse(line) for line in lines if line.strip())
    return summaries


def _num(value: Any) -> float:
    """A metric value as a float; NaN for null, absent or non-numbers (matplotlib leaves a gap)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def _dig(record: Mapping[str, Any], *path: str) -> float:
    node: Any = record.get("metrics", {})
    for name in path:
        node = node.get(name) if isinstance(node, Mapping) else None
    return _num(node)


def _has_data(values: Sequence[float]) -> bool:
    return any(math.isfinite(v) for v in values)


class _Clock:
    """Event time of a run as seconds or minutes since its first value."""

    def __init__(self, records: Sequence[Mapping[str, Any]]) -> None:
        starts = [_num(r.get("first_ts")) for r in records] + [
            _num(r.get("last_ts")) for r in records
        ]
        finite = [t for t in starts if math.isfinite(t)]
        self.start = min(finite, default=0.0)
        span = max(finite, default=0.0) - self.start
        self.scale, self.label = (60.0, "minutes") if span > 600 else (1.0, "seconds")

    def x(self, record: Mapping[str, Any]) -> float:
        ts = _num(record.get("last_ts"))
        if not math.isfinite(ts):
            ts = _num(record.get("emitted_at"))
        return (ts - self.start) / self.scale

    def axis(self) -> str:
        return f"event time since the run's first value ({self.label})"


def _new_figure(rows: int = 1, *, height: float | None = None) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(_FIGSIZE[0], height or _FIGSIZE[1] * (1 if rows == 1 else 0.75 * rows)))
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0].tolist()
    return fig, axes


def _lines(
    ax: Any,
    xs: Sequence[float],
    series: Mapping[str, tuple[Sequence[float], dict[str, Any]]],
) -> bool:
    """Plot each named series that has a finite value; True when anything was drawn."""
    drawn = False
    for label, (ys, style) in series.items():
        if not _has_data(ys):
            continue
        marker = "o" if len(xs) <= 12 else None
        ax.plot(xs, ys, label=label, marker=marker, markersize=4, linewidth=1.6, **style)
        drawn = True
    return drawn


def _finish(
    fig: Any, axes: list[Any], title: str, clock: _Clock, *, time_axis: bool = True
) -> None:
    fig.suptitle(title, fontsize=12)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8, framealpha=0.85)
    if time_axis:
        axes[-1].set_xlabel(clock.axis())
    fig.tight_layout()


def _seconds_unit(values: Sequence[float]) -> tuple[float, str]:
    """Batch times in ms when they are below a second, else in s."""
    finite = [v for v in values if math.isfinite(v)]
    return (1000.0, "ms") if finite and max(finite) < 1.0 else (1.0, "s")


def _window_text(record: Mapping[str, Any]) -> str:
    w = record.get("window", {})
    if w.get("kind") == "count":
        return f"count window of {w.get('size')} values"
    seconds = _num(w.get("seconds"))
    return f"{seconds:g} s time window"


def _step_time(summaries: Summaries, run: str, clock: _Clock) -> dict[str, Any]:
    series = summaries.series(run, "batch_time")
    if not series:
        return {}
    out: dict[str, Any] = {}
    xs = [clock.x(r) for r in series]
    values = {k: [_dig(r, k) for r in series] for k in ("median", "p95", "p99", "mean")}
    scale, unit = _seconds_unit(values["p99"] + values["mean"])
    fig, (ax,) = _new_figure()
    drawn = _lines(
        ax,
        xs,
        {
            "p50 (median)": ([v * scale for v in values["median"]], {"color": _COLOURS["median"]}),
            "p95": ([v * scale for v in values["p95"]], {"color": _COLOURS["p95"]}),
            "p99": ([v * scale for v in values["p99"]], {"color": _COLOURS["p99"]}),
            "mean": (
                [v * scale for v in values["mean"]],
                {"color": _COLOURS["mean"], "linestyle": "--"},
            ),
        },
    )
    if drawn:
        ax.set_ylabel(f"batch time ({unit})")
        ax.set_ylim(bottom=0)
        _finish(fig, [ax], f"Step time, {_window_text(series[-1])}: run {run}", clock)
        out["step_time"] = fig
    dist = _distribution(summaries, run)
    if dist is not None:
        out["step_time_distribution"] = dist
    rate = throughput(series)
    # A distributed run's batch_time holds every rank's batches: one step is a batch per rank.
    ranked = summaries.latest(run, "ranks")
    count = _dig(ranked, "ranks") if ranked is not None else math.nan
    ranks = int(count) if math.isfinite(count) and count > 1 else 1
    observed = (
        "observed steps/s (Δ batches / Δ event time)"
        if ranks == 1
        else f"observed steps/s (Δ batches / Δ event time / {ranks} ranks)"
    )
    inverse = [1.0 / v if v > 0 else math.nan for v in values["mean"]]
    fig, (ax,) = _new_figure()
    drawn = False
    if rate:
        ax.plot(
            [(t - clock.start) / clock.scale for t, _ in rate],
            [r / ranks for _, r in rate],
            label=observed,
            color="tab:purple",
            linewidth=1.6,
            marker="o" if len(rate) <= 12 else None,
        )
        drawn = True
    drawn = (
        _lines(
            ax,
            xs,
            {
                "1 / mean batch time (if nothing waited)": (
                    inverse,
                    {"color": "tab:green", "linestyle": "--"},
                )
            },
        )
        or drawn
    )
    if drawn:
        ax.set_ylabel("steps per second")
        ax.set_ylim(bottom=0)
        _finish(fig, [ax], f"Throughput: run {run}", clock)
        out["throughput"] = fig
    return out


def _distribution(summaries: Summaries, run: str) -> Any:
    """The latest batch_time summary of each window: one row each, min-max, mean ± std, pNN."""
    latest = [
        r
        for tag in summaries.windows(run, "batch_time")
        if (r := summaries.latest(run, "batch_time", tag)) is not None
        and math.isfinite(_dig(r, "median"))
    ]
    if not latest:
        return None
    keys = ("min", "median", "p95", "p99", "max", "mean", "std")
    rows = [{k: _dig(r, k) for k in keys} for r in latest]
    scale, unit = _seconds_unit([row["max"] for row in rows])
    fig, (ax,) = _new_figure(height=1.6 + 0.9 * len(rows))
    for y, row in enumerate(rows):
        v = {k: row[k] * scale for k in keys}
        ax.plot([v["min"], v["max"]], [y, y], color=_COLOURS["min"], linewidth=1.2, zorder=1)
        if math.isfinite(v["std"]):
            # mean ± std, clipped to the window's range (a straggler makes std exceed the mean)
            low, high = max(v["min"], v["mean"] - v["std"]), min(v["max"], v["mean"] + v["std"])
            ax.barh(
                y,
                high - low,
                left=low,
                height=0.35,
                color=_COLOURS["mean"],
                alpha=0.25,
                label="mean ± std" if y == 0 else None,
                zorder=2,
            )
        for key, marker, name in (
            ("min", "|", "min / max"),
            ("max", "|", None),
            ("mean", "D", "mean"),
            ("median", "o", "p50 (median)"),
            ("p95", "s", "p95"),
            ("p99", "^", "p99"),
        ):
            if math.isfinite(v[key]):
                ax.scatter(
                    [v[key]],
                    [y],
                    marker=marker,
                    s=90 if marker == "|" else 45,
                    color=_COLOURS[key],
                    label=name if y == 0 else None,
                    zorder=3,
                )
    ax.set_yticks(
        range(len(rows)),
        [
            f"{window_tag(r['window'])}\n({r.get('count')} values"
            + (", truncated)" if r["window"].get("truncated") else ")")
            for r in latest
        ],
    )
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel(f"batch time ({unit})")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.suptitle(f"Latest batch-time distribution per window: run {run}", fontsize=12)
    fig.tight_layout()
    return fig


_QUALITY = {
    "binary": (
        ("f1", "tab:blue"),
        ("accuracy", "tab:green"),
        ("precision", "tab:orange"),
        ("recall", "tab:red"),
    ),
    "multiclass": (
        ("accuracy", "tab:green"),
        ("f1_macro", "tab:blue"),
        ("f1_weighted", "tab:purple"),
    ),
}


def _quality(summaries: Summaries, run: str, clock: _Clock) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stream in summaries.streams(run):
        if not stream.startswith("prediction/"):
            continue
        series = summaries.series(run, stream)
        if not series:
            continue
        split, task = stream.partition("/")[2], stream_kind(series[-1])
        xs = [clock.x(r) for r in series]
        title = (
            f"{task.capitalize()} quality on split {split!r}, {_window_text(series[-1])}: run {run}"
        )
        if task in _QUALITY:
            fig, (ax,) = _new_figure()
            lines = {
                name.replace("_", " "): ([_dig(r, name) for r in series], {"color": colour})
                for name, colour in _QUALITY[task]
            }
            if not _lines(ax, xs, lines):
                continue
            ax.set_ylabel("score (0 to 1)")
            ax.set_ylim(0, 1.02)
            _finish(fig, [ax], title, clock)
        elif task == "regression":
            fig, (top, bottom) = _new_figure(2)
            errors = _lines(
                top,
                xs,
                {
                    "rmse": ([_dig(r, "rmse") for r in series], {"color": "tab:red"}),
                    "mae": ([_dig(r, "mae") for r in series], {"color": "tab:orange"}),
                },
            )
            fit = _lines(
                bottom,
                xs,
                {
                    "r2": ([_dig(r, "r2") for r in series], {"color": "tab:blue"}),
                    "pearson r": ([_dig(r, "pearson_r") for r in series], {"color": "tab:cyan"}),
                    "within threshold": (
                        [_dig(r, "within_threshold") for r in series],
                        {"color": "tab:green", "linestyle": "--"},
                    ),
                },
            )
            if not (errors and fit):
                if not (errors or fit):
                    continue
                fig, (ax,) = _new_figure()
                _lines(
                    ax,
                    xs,
                    {"rmse": ([_dig(r, "rmse") for r in series], {"color": "tab:red"})}
                    if errors
                    else {"r2": ([_dig(r, "r2") for r in series], {"color": "tab:blue"})},
                )
                ax.set_ylabel("error (target units)" if errors else "r2")
                _finish(fig, [ax], title, clock)
            else:
                top.set_ylabel("error (target units)")
                top.set_ylim(bottom=0)
                bottom.set_ylabel("r2, r, fraction")
                _finish(fig, [top, bottom], title, clock)
        else:
            continue
        out[f"quality_{_safe(split)}"] = fig
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _band(
    ax: Any,
    xs: list[float],
    series: list[Record],
    figure: str,
    colour: str,
    label: str,
    scale: float = 1.0,
) -> bool:
    """Window mean of a per-event figure as a line, its min-max over the window as a band."""
    mean = [_dig(r, figure, "mean") * scale for r in series]
    if not _has_data(mean):
        return False
    low = [_dig(r, figure, "min") * scale for r in series]
    high = [_dig(r, figure, "max") * scale for r in series]
    ax.plot(
        xs,
        mean,
        color=colour,
        linewidth=1.6,
        label=f"{label} (window mean)",
        marker="o" if len(xs) <= 12 else None,
    )
    if _has_data(low) and _has_data(high):
        ax.fill_between(xs, low, high, color=colour, alpha=0.18, label="min to max in window")
    return True


def _cv(summaries: Summaries, run: str, clock: _Clock) -> dict[str, Any]:
    series = summaries.series(run, "cv")
    if not series:
        return {}
    xs = [clock.x(r) for r in series]
    fig, (ax,) = _new_figure()
    drawn = False
    for name, colour, label in (
        ("train", "tab:blue", "mean train loss"),
        ("val", "tab:orange", "mean validation loss"),
    ):
        mean = [_dig(r, f"mean_{name}_loss") for r in series]
        if not _has_data(mean):
            continue
        ci = [_dig(r, f"{name}_loss_ci_95") for r in series]
        ax.plot(
            xs,
            mean,
            color=colour,
            linewidth=1.6,
            label=label,
            marker="o" if len(xs) <= 12 else None,
        )
        if _has_data(ci):
            ax.fill_between(
                xs,
                [m - c for m, c in zip(mean, ci, strict=True)],
                [m + c for m, c in zip(mean, ci, strict=True)],
                color=colour,
                alpha=0.2,
                label=f"{label} ± 95% CI",
            )
        drawn = True
    if not drawn:
        return {}
    folds = _num(series[-1].get("metrics", {}).get("folds"))
    ax.set_ylabel("loss")
    ax.set_ylim(bottom=0)
    text = f", {folds:.0f} folds in the latest window" if math.isfinite(folds) else ""
    _finish(fig, [ax], f"Cross-validation fold losses{text}: run {run}", clock)
    return {"cv": fig}


def _attention(summaries: Summaries, run: str, clock: _Clock) -> dict[str, Any]:
    series = summaries.series(run, "attention")
    if not series:
        return {}
    xs = [clock.x(r) for r in series]
    fig, (top, bottom) = _new_figure(2)
    entropy = _band(top, xs, series, "entropy", "tab:purple", "entropy")
    concentration = _band(bottom, xs, series, "concentration", "tab:brown", "concentration")
    if not (entropy or concentration):
        return {}
    if not (entropy and concentration):  # one of the two only: a figure with one axis
        fig, (ax,) = _new_figure()
        if entropy:
            _band(ax, xs, series, "entropy", "tab:purple", "entropy")
        else:
            _band(ax, xs, series, "concentration", "tab:brown", "concentration")
        ax.set_ylabel("entropy (nats)" if entropy else "max mean weight")
        _finish(fig, [ax], f"Attention: run {run}", clock)
        return {"attention": fig}
    top.set_ylabel("entropy (nats)")
    bottom.set_ylabel("concentration\n(max mean weight)")
    _finish(
        fig,
        [top, bottom],
        f"Attention, per matrix over the {_window_text(series[-1])}: run {run}",
        clock,
    )
    return {"attention": fig}


def _features(summaries: Summaries, run: str, clock: _Clock) -> dict[str, Any]:
    series = summaries.series(run, "features")
    if not series:
        return {}
    xs = [clock.x(r) for r in series]
    fig, (top, bottom) = _new_figure(2)
    sparsity = _band(top, xs, series, "sparsity", "tab:olive", "sparsity", scale=100.0)
    l2 = _band(bottom, xs, series, "l2_norm", "tab:cyan", "L2 norm")
    if not (sparsity or l2):
        return {}
    if not (sparsity and l2):
        fig, (ax,) = _new_figure()
        if sparsity:
            _band(ax, xs, series, "sparsity", "tab:olive", "sparsity", scale=100.0)
        else:
            _band(ax, xs, series, "l2_norm", "tab:cyan", "L2 norm")
        ax.set_ylabel("zero entries (%)" if sparsity else "L2 norm")
        _finish(fig, [ax], f"Features: run {run}", clock)
        return {"features": fig}
    top.set_ylabel("zero entries (%)")
    top.set_ylim(0, 100)
    bottom.set_ylabel("L2 norm")
    _finish(
        fig,
        [top, bottom],
        f"Features, per vector over the {_window_text(series[-1])}: run {run}",
        clock,
    )
    return {"features": fig}


def _scalar_order(name: str) -> tuple[int, str]:
    """Loss names first (``loss``, then ``*loss*``), the emitter's own scalars last."""
    if name == "loss":
        return (0, name)
    if "loss" in name:
        return (1, name)
    return (3 if name.startswith("emitter/") else 2, name)


def _scalars(summaries: Summaries, run: str, clock: _Clock) -> dict[str, Any]:
    """One panel per scalar name with data: window mean, min-max band, non-finite marks."""
    names = sorted(
        (s[len("scalar/") :] for s in summaries.streams(run) if s.startswith("scalar/")),
        key=_scalar_order,
    )
    panels = [(n, summaries.series(run, f"scalar/{n}")) for n in names]
    panels = [(n, series) for n, series in panels if series]
    panels = [(n, s) for n, s in panels if _has_data([_dig(r, "mean") for r in s])]
    if not panels:
        return {}
    shown = panels[:MAX_SCALAR_PANELS]
    fig, axes = _new_figure(len(shown), height=1.0 + 2.1 * len(shown))
    for ax, (name, series), colour in zip(axes, shown, _PANEL_COLOURS, strict=False):
        xs = [clock.x(r) for r in series]
        mean = [_dig(r, "mean") for r in series]
        ax.plot(
            xs,
            mean,
            color=colour,
            linewidth=1.6,
            label="window mean",
            marker="o" if len(xs) <= 12 else None,
        )
        low = [_dig(r, "min") for r in series]
        high = [_dig(r, "max") for r in series]
        if _has_data(low) and _has_data(high):
            ax.fill_between(xs, low, high, color=colour, alpha=0.18, label="min to max")
        bad = [(x, _dig(r, "non_finite")) for x, r in zip(xs, series, strict=True)]
        bad = [(x, n) for x, n in bad if math.isfinite(n) and n > 0]
        if bad:
            top = ax.get_ylim()[1]
            ax.plot(
                [x for x, _ in bad],
                [top] * len(bad),
                linestyle="none",
                marker="v",
                color="tab:red",
                markersize=7,
                clip_on=False,
                label=f"non-finite in window (max {max(n for _, n in bad):.0f})",
            )
            ax.set_ylim(top=top)
        ax.set_ylabel(name if len(name) <= 24 else name[:22] + "…", fontsize=9)
    more = len(panels) - len(shown)
    extra = f" ({more} more names not shown)" if more else ""
    _finish(fig, axes, f"Scalars, {_window_text(shown[0][1][-1])}: run {run}{extra}", clock)
    return {"scalars": fig}


def _ranks(summaries: Summaries, run: str, clock: _Clock) -> dict[str, Any]:
    """Bars of the latest ranks summary: each listed rank's median step time, stragglers red."""
    latest = summaries.latest(run, "ranks")
    if latest is None:
        return {}
    metrics = latest.get("metrics") or {}
    listed = [s for s in metrics.get("slowest") or [] if isinstance(s, Mapping)]
    bars = sorted(
        (
            (int(s["rank"]), _num(s.get("median")), _num(s.get("z")))
            for s in listed
            if isinstance(s.get("rank"), int) and math.isfinite(_num(s.get("median")))
        ),
    )
    if not bars:
        return {}
    stragglers = {r for r in metrics.get("stragglers") or [] if isinstance(r, int)}
    scale, unit = _seconds_unit([m for _, m, _ in bars])
    fig, (ax,) = _new_figure()
    positions = list(range(len(bars)))
    threshold = _dig(latest, "threshold")
    for slow, colour, label in (
        (False, "tab:blue", "rank"),
        (True, "tab:red", f"straggler (robust z > {threshold:g})"),
    ):
        mine = [
            (x, m)
            for x, (r, m, _) in zip(positions, bars, strict=True)
            if (r in stragglers) == slow
        ]
        if mine:
            ax.bar(
                [x for x, _ in mine],
                [m * scale for _, m in mine],
                color=colour,
                width=0.7,
                label=label,
            )
    for x, (r, m, z) in zip(positions, bars, strict=True):
        if r in stragglers and math.isfinite(z):
            ax.annotate(
                f"z = {z:.1f}",
                (x, m * scale),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
    centre = _dig(latest, "median")
    if math.isfinite(centre):
        ax.axhline(
            centre * scale,
            color="tab:gray",
            linestyle="--",
            linewidth=1.2,
            label="median of the ranks' medians",
        )
    ax.set_xticks(positions, [str(r) for r, _, _ in bars])
    ax.set_xlabel("rank")
    ax.set_ylabel(f"median step time ({unit})")
    ax.set_ylim(bottom=0)
    ranks = _num(metrics.get("ranks"))
    shown = (
        f"the {len(bars)} slowest of {ranks:.0f} ranks"
        if ranks > len(bars)
        else (f"{len(bars)} ranks")
    )
    _finish(
        fig,
        [ax],
        f"Per-rank step time, {shown}, {_window_text(latest)}: run {run}",
        clock,
        time_axis=False,
    )
    return {"ranks": fig}


def _ranks_z(summaries: Summaries, run: str, clock: _Clock) -> dict[str, Any]:
    """The slowest rank's robust z over time against the straggler threshold."""
    series = summaries.series(run, "ranks")
    xs = [clock.x(r) for r in series]
    top = [_dig(r, "max_z") for r in series]
    if not _has_data(top):
        return {}
    fig, (ax,) = _new_figure()
    ax.plot(xs, top, color="tab:purple", linewidth=1.6, label="slowest rank's robust z",
            marker="o" if len(xs) <= 12 else None)  # fmt: skip
    threshold = _dig(series[-1], "threshold")
    if math.isfinite(threshold):
        ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1.2,
                   label=f"straggler threshold (z = {threshold:g})")  # fmt: skip
    counts = [_dig(r, "straggler_count") for r in series]
    flagged = [
        (x, z) for x, z, n in zip(xs, top, counts, strict=True) if math.isfinite(n) and n > 0
    ]
    if flagged:
        ax.plot([x for x, _ in flagged], [z for _, z in flagged], linestyle="none", marker="o",
                color="tab:red", markersize=5, label="windows with stragglers")  # fmt: skip
    ax.set_ylabel("robust z of the slowest rank's median")
    if max(z for z in top if math.isfinite(z)) > 30:
        # Tight ranks make a slow one's z run into the hundreds: log above 10 keeps the
        # threshold readable next to them.
        ax.set_yscale("symlog", linthresh=10)
        # symlog labels only the decades: name 0 and the threshold in the linear part too.
        peak = max(z for z in top if math.isfinite(z))
        decades = [10.0**k for k in range(1, int(math.log10(peak)) + 2)]
        marks = [0.0, *([threshold] if math.isfinite(threshold) else []), *decades]
        ax.set_yticks(marks, [f"{m:g}" for m in marks])
        ax.set_ylim(bottom=0.0)
    _finish(fig, [ax], f"Straggler score, {_window_text(series[-1])}: run {run}", clock)
    return {"ranks_z": fig}


def build_figures(summaries: Summaries, run: str) -> dict[str, Any]:
    """``{name: matplotlib Figure}`` for every figure of ``run`` with data, in report order."""
    records = [r for s in summaries.streams(run) for r in summaries.series(run, s)]
    if not records:
        return {}
    clock = _Clock(records)
    figures: dict[str, Any] = {}
    builders: tuple[Callable[[Summaries, str, _Clock], dict[str, Any]], ...] = (
        _step_time,
        _quality,
        _cv,
        _attention,
        _features,
        _scalars,
        _ranks,
        _ranks_z,
    )
    for build in builders:
        figures.update(build(summaries, run, clock))
    return figures


def headline(summaries: Summaries, run: str) -> list[tuple[str, str, str]]:
    """``(stream, figure, value)`` rows: the key figures of each stream's latest count window,
    after the run's state, duration and step count."""
    rows: list[tuple[str, str, str]] = []
    records = [r for s in summaries.streams(run) for r in summaries.series(run, s)]
    if not records:
        return rows
    clock = _Clock(records)
    end = max((_num(r.get("last_ts")) for r in records), default=math.nan)
    rows.append(("run", "state", "ended" if summaries.is_final(run) else "running (or idle)"))
    if math.isfinite(end):
        rows.append(("run", "event time covered", _duration(end - clock.start)))
    steps = summaries.latest(run, "batch_time")
    if steps is not None:
        rows.append(("run", "batches seen", f"{steps.get('total')}"))
    for stream in summaries.streams(run):
        latest = summaries.latest(run, stream)
        if latest is None:
            continue
        for figure in key_figures(latest):
            rows.append((stream, figure.label, figure.text()))
    return rows


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


_CAPTIONS = {
    "step_time": "Batch time percentiles of the count window, summary by summary.",
    "step_time_distribution": "The latest summary of every window: grey line min to max, green "
    "band mean ± std, markers mean and percentiles.",
    "throughput": "Observed training speed next to the speed the batch times alone would allow; "
    "a gap means steps wait for something else (input pipeline, evaluation, checkpoints).",
    "cv": "Mean fold losses of the cross-validation window; bands are ± 95% confidence intervals.",
    "attention": "Window mean per attention matrix; bands span the window's min to max.",
    "features": "Window mean per feature vector; bands span the window's min to max.",
    "scalars": "Window mean of each logged scalar; bands span the window's min to max; red "
    "marks where the window held non-finite values (NaN or infinite), with the largest count.",
    "ranks": "Median step time of each rank in the latest ranks summary; red bars are "
    "stragglers (robust z of the rank's median above the threshold); dashed: the ranks' median.",
    "ranks_z": "Robust z of the slowest rank's median step time against the run's ranks, per "
    "ranks summary; above the dashed threshold that rank is a straggler.",
}


def write_report(summaries: Summaries, run: str, out: Path) -> list[Path]:
    """Write every figure of ``run`` as PNG and ``index.html`` into ``out``; the paths written
    (PNGs in report order, the HTML page last). A run without summaries gets a page saying so."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sections: list[str] = []
    for name, fig in build_figures(summaries, run).items():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=_DPI)
        data = buffer.getvalue()
        path = out / f"{name}.png"
        path.write_bytes(data)
        written.append(path)
        caption = _CAPTIONS.get(
            name, "Window metrics of the prediction stream, summary by summary."
        )
        sections.append(
            f'<figure id="{html.escape(name)}"><img alt="{html.escape(name)}" '
            f'data-file="{html.escape(path.name)}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'
            f"<figcaption>{html.escape(caption)} ({html.escape(path.name)})</figcaption></figure>"
        )
    rows = "".join(
        f"<tr><td>{html.escape(s)}</td><td>{html.escape(f)}</td><td>{html.escape(v)}</td></tr>"
        for s, f, v in headline(summaries, run)
    )
    body = (
        f"<table><thead><tr><th>stream</th><th>figure</th><th>latest</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>{''.join(sections)}"
        if rows
        else "<p>No summaries of this run were found.</p>"
    )
    page = out / "index.html"
    page.write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>metricsd report: {html.escape(run)}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:960px;color:#222}"
        "table{border-collapse:collapse;margin-bottom:2em}"
        "td,th{padding:.25em .8em;border-bottom:1px solid #ddd;text-align:left}"
        "td:last-child{text-align:right;font-variant-numeric:tabular-nums}"
        "figure{margin:0 0 2em}img{max-width:100%}figcaption{color:#555;font-size:.9em}"
        f"</style></head><body><h1>Run {html.escape(run)}</h1>"
        f"<p>{len(summaries)} summaries after de-duplication on id "
        f"({summaries.duplicates} duplicate copies skipped, {summaries.replaced} replaced by a "
        f"later copy).</p>{body}</body></html>\n",
        encoding="utf-8",
    )
    written.append(page)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metricsd report",
        description="PNG figures and one HTML page for one run, from the summary topic or a file.",
    )
    parser.add_argument("--run", required=True, help="the run id")
    parser.add_argument(
        "--input",
        type=Path,
        default=None,
        help="JSON-lines file of summaries (what `metricsd tail --json` printed) instead of Kafka",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("."), help="output directory [%(default)s]"
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=3.0,
        help="from Kafka: stop reading at the topic's end as it was at the start, or after this "
        "many seconds without a record [%(default)s]",
    )
    add_connection_flags(parser)
    return parser


async def _read_topic(args: argparse.Namespace, summaries: Summaries) -> None:
    security = security_from(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def handle(values: list[bytes | None]) -> None:
        summaries.extend(parse(v) for v in values)

    waiting = [False]

    def on_waiting(why: str) -> None:
        if why:
            waiting[0] = True
            stop.set()  # a topic that does not exist holds no run

    await read_records(
        args.bootstrap_servers,
        args.topic,
        security,
        handle,
        stop,
        from_beginning=True,
        idle=args.idle,
        until_end=True,
        on_waiting=on_waiting,
    )
    if waiting[0]:
        raise ConfigError(f"topic {args.topic!r} does not exist")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``metricsd report``: 0 with a report, 1 when the run has no summaries."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        if args.input is not None:
            summaries = load_file(args.input, args.run)
        else:
            logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
            summaries = Summaries(run=args.run)
            asyncio.run(_read_topic(args, summaries))
    except (ConfigError, OSError) as exc:
        print(f"metricsd report: {exc}", file=sys.stderr)
        return 2
    except kafka.KafkaAuthError as exc:
        print(f"metricsd report: {exc}", file=sys.stderr)
        return 2
    except kafka.KafkaConnectionError as exc:
        print(f"metricsd report: cannot reach {args.bootstrap_servers}: {exc}", file=sys.stderr)
        return 1
    written = write_report(summaries, args.run, args.out)
    for path in written:
        print(path)
    if not summaries.runs():
        print(f"metricsd report: no summaries of run {args.run!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
