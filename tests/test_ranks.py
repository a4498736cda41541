"""The ranks summary: per-rank step-time windows of a run whose batch_time events carry rank,
checked against numpy computed independently from the same events."""

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
from metricsd import stats
from metricsd.config import MonitorSettings
from metricsd.events import BatchTime, Decoder
from metricsd.monitor import Monitor
from metricsd.records import encode
from metricsd.summaries import key_figures
from metricsd.windows import STRAGGLER_Z, TOP_RANKS

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
_decoder = Decoder()
VALIDATOR = jsonschema.Draft202012Validator(
    json.loads((SCHEMAS / "summary.schema.json").read_text())
)


def ev(**doc: Any) -> Any:
    return _decoder.decode(None, orjson.dumps(doc))


def ranks_records(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The ranks record of each run, schema-checked as a consumer sees it (NaN -> null)."""
    out = {}
    for rec in records:
        VALIDATOR.validate(orjson.loads(encode(rec)))
        if rec["stream"] == "ranks":
            assert rec["run_id"] not in out
            out[rec["run_id"]] = rec
    return out


def oracle_z(medians: np.ndarray) -> np.ndarray:
    """z = (m - median(m)) / (1.4826 MAD); MAD 0: 1.253314 * mean |m - median(m)|; all equal: 0."""
    center = np.median(medians)
    mad = np.median(np.abs(medians - center))
    scale = 1.4826 * mad if mad > 0 else 1.253314 * np.mean(np.abs(medians - center))
    if scale == 0:
        return np.zeros_like(medians)
    return (medians - center) / scale


def run_ranks(
    seconds: dict[int, np.ndarray], *, window: int = 100, **settings: Any
) -> dict[str, Any]:
    monitor = Monitor(MonitorSettings(window=window, time_windows=(), **settings))
    events = [
        ev(type="batch_time", run_id="r", ts=100.0 + i, rank=r, seconds=values.tolist())
        for i, (r, values) in enumerate(seconds.items())
    ]
    monitor.ingest(events, now=200.0)
    return ranks_records(monitor.due(200.0))["r"]


def test_per_rank_medians_p95_and_z_match_numpy() -> None:
    """Ranks with different counts (some beyond the window): each rank's count/median/p95 over
    its newest `window` values, z of the medians and the slowest-first order as numpy says."""
    rng = np.random.default_rng(7)
    seconds = {
        r: rng.lognormal(-2 + 0.05 * r, 0.2, int(rng.integers(3, 160))) for r in (0, 3, 4, 9, 11)
    }
    rec = run_ranks(seconds, window=100)
    m = rec["metrics"]
    kept = {r: v[-100:] for r, v in seconds.items()}
    medians = {r: np.median(v) for r, v in kept.items()}
    z = dict(zip(kept, oracle_z(np.array(list(medians.values()))), strict=True))
    assert m["ranks"] == 5 and m["count"] == rec["count"] == sum(len(v) for v in kept.values())
    assert rec["total"] == sum(len(v) for v in seconds.values())
    assert m["median"] == pytest.approx(np.median(list(medians.values())), rel=1e-12)
    assert [s["rank"] for s in m["slowest"]] == sorted(kept, key=lambda r: -medians[r])
    for s in m["slowest"]:
        r = s["rank"]
        assert s["count"] == len(kept[r])
        assert s["median"] == pytest.approx(medians[r], rel=1e-12)
        assert s["p95"] == pytest.approx(np.percentile(kept[r], 95), rel=1e-12)
        assert s["z"] == pytest.approx(z[r], rel=1e-9, abs=1e-12)
    assert m["max_z"] == pytest.approx(max(z.values()), rel=1e-9)
    assert m["stragglers"] == [r for r in m["slowest"] if z[r["rank"]] > 3.5] == []


def test_one_rank_three_times_slower_is_the_only_straggler() -> None:
    """8 ranks with noisy step times, rank 5 3x slower: stragglers == [5], listed first."""
    rng = np.random.default_rng(3)
    seconds = {r: rng.normal(0.1, 0.005, 50) * (3 if r == 5 else 1) for r in range(8)}
    m = run_ranks(seconds)["metrics"]
    medians = np.array([np.median(seconds[r]) for r in range(8)])
    z = oracle_z(medians)
    assert np.flatnonzero(z > STRAGGLER_Z).tolist() == [5]
    assert m["stragglers"] == [5] and m["straggler_count"] == 1
    assert m["slowest"][0]["rank"] == 5 and m["slowest"][0]["z"] == pytest.approx(z[5])
    assert m["threshold"] == STRAGGLER_Z


def test_mad_zero_falls_back_to_the_mean_absolute_deviation() -> None:
    """5 of 8 ranks share one median: MAD is 0, the scale is 1.253314 * mean |m - median|, and
    the two ranks off the median still get a finite z (the slow one a straggler)."""
    seconds = {r: np.full(10, 0.1) for r in range(8)}
    seconds[6] = np.full(10, 0.11)
    seconds[2] = np.full(10, 0.5)
    seconds[7] = np.full(10, 0.09)
    m = run_ranks(seconds)["metrics"]
    medians = np.array([seconds[r][0] for r in range(8)])
    assert np.median(np.abs(medians - np.median(medians))) == 0
    assert m["mad"] == 0 and m["scale"] == pytest.approx(1.253314 * np.mean(np.abs(medians - 0.1)))
    by_rank = {s["rank"]: s["z"] for s in m["slowest"]}
    for r, want in enumerate(oracle_z(medians)):
        assert by_rank[r] == pytest.approx(want, abs=1e-12)
    assert m["stragglers"] == [2]


@pytest.mark.parametrize("ranks", [1, 4])
def test_equal_medians_or_one_rank_give_z_zero_and_no_straggler(ranks: int) -> None:
    """Every median equal (one rank, or identical ranks): MAD and mean AD are 0, the scale is
    undefined (null on the wire), every z is 0 and nothing is a straggler."""
    m = run_ranks({r: np.array([0.2, 0.3, 0.2]) for r in range(ranks)})["metrics"]
    assert m["ranks"] == ranks and m["mad"] == 0 and np.isnan(m["scale"])
    assert [s["z"] for s in m["slowest"]] == [0.0] * ranks
    assert m["stragglers"] == [] and m["max_z"] == 0.0


def test_ranks_beyond_the_cap_are_counted_as_dropped_not_tracked() -> None:
    """max_ranks=3: ranks 0-2 get windows; the values of ranks 3 and 4 are counted in the run's
    ``dropped`` and the monitor's counter, and still count in batch_time."""
    monitor = Monitor(MonitorSettings(window=100, time_windows=(), max_ranks=3))
    events = [ev(type="batch_time", run_id="r", rank=r, seconds=[0.1] * (r + 1)) for r in range(5)]
    monitor.ingest(events, now=1.0)
    records = monitor.due(1.0)
    m = ranks_records(records)["r"]["metrics"]
    assert m["ranks"] == 3 and {s["rank"] for s in m["slowest"]} == {0, 1, 2}
    assert m["dropped"] == 4 + 5 == monitor.rank_values_dropped
    (bt,) = [r for r in records if r["stream"] == "batch_time"]
    assert bt["count"] == 15
    # a tracked rank keeps its window; an untracked one stays dropped
    monitor.ingest([ev(type="batch_time", run_id="r", rank=1, seconds=0.2),
                    ev(type="batch_time", run_id="r", rank=4, seconds=0.2)], now=2.0)  # fmt: skip
    m = ranks_records(monitor.due(2.0))["r"]["metrics"]
    assert m["ranks"] == 3 and m["dropped"] == 10 and m["count"] == 7


def test_top_k_lists_the_slowest_sixteen_and_counts_all_stragglers() -> None:
    """40 ranks, the 20 highest-numbered far slower: ``slowest`` holds the TOP_RANKS slowest,
    ``stragglers`` at most TOP_RANKS, ``straggler_count`` all of them; totals cover all ranks."""
    seconds = {r: np.array([0.1 + 0.0001 * r + (1.0 * r if r >= 36 else 0.0)]) for r in range(40)}
    m = run_ranks(seconds)["metrics"]
    assert m["ranks"] == 40 and m["count"] == 40
    assert len(m["slowest"]) == TOP_RANKS == 16
    assert [s["rank"] for s in m["slowest"]] == list(range(39, 23, -1))
    assert m["stragglers"] == [39, 38, 37, 36] and m["straggler_count"] == 4


def test_no_rank_no_ranks_summary_and_runs_are_separate() -> None:
    """Events without rank make no ranks stream; two runs with ranks get one record each, each
    over its own ranks only, with a seq that advances per tick."""
    monitor = Monitor(MonitorSettings(window=10, time_windows=()))
    monitor.ingest([ev(type="batch_time", run_id="plain", seconds=0.1)], now=1.0)
    assert ranks_records(monitor.due(1.0)) == {}
    for tick in range(2):
        monitor.ingest(
            [ev(type="batch_time", run_id=run, rank=r, seconds=0.1 * (i + 1) + r)
             for i, run in enumerate(("a", "b")) for r in range(i + 2)],
            now=2.0 + tick,
        )  # fmt: skip
        recs = ranks_records(monitor.due(2.0 + tick))
        assert sorted(recs) == ["a", "b"]
        assert (recs["a"]["metrics"]["ranks"], recs["b"]["metrics"]["ranks"]) == (2, 3)
        assert recs["a"]["seq"] == tick and recs["a"]["id"] == f"|a|ranks||count:10|{tick}"


def test_run_end_publishes_a_final_ranks_summary_and_frees_the_rows() -> None:
    monitor = Monitor(MonitorSettings(window=10, time_windows=()))
    monitor.ingest([ev(type="batch_time", run_id="r", rank=r, seconds=0.1) for r in range(3)], 1.0)
    monitor.due(1.0)
    monitor.ingest([ev(type="run_end", run_id="r", status="ok")], now=2.0)
    rec = ranks_records(monitor.due(2.0))["r"]
    assert rec["final"] and rec["metrics"]["ranks"] == 3 and rec["seq"] == 1
    assert monitor.rows_tracked == 0


def test_changelog_state_restores_the_ranks_windows() -> None:
    """The rank rows travel in state_changes like every other row: a monitor restored from them
    publishes the same ranks summary (and seq) as the original after the same next event."""
    rng = np.random.default_rng(5)
    original = Monitor(MonitorSettings(window=20, time_windows=()), track_changes=True)
    original.ingest(
        [ev(type="batch_time", run_id="r", ts=10.0, rank=r, seconds=rng.random(30).tolist())
         for r in range(4)],
        now=11.0,
    )  # fmt: skip
    original.due(11.0)
    changed, removed = original.state_changes()
    assert removed == [] and {s.stream for _, s in changed} >= {f"rank/{r}" for r in range(4)}
    restored = Monitor(MonitorSettings(window=20, time_windows=()))
    for partition, state in changed:
        restored.restore(state, partition)
    nxt = [ev(type="batch_time", run_id="r", ts=12.0, rank=2, seconds=0.9)]
    outs = []
    for monitor in (original, restored):
        monitor.ingest(nxt, now=12.0)
        outs.append(ranks_records(monitor.due(12.0))["r"])
    assert outs[0]["metrics"] == outs[1]["metrics"] and outs[0]["seq"] == outs[1]["seq"] == 1


def test_robust_z_rows_match_numpy() -> None:
    """stats.robust_z over a ragged block (invalid slots NaN) equals the per-row numpy oracle."""
    rng = np.random.default_rng(11)
    values = rng.random((6, 9))
    valid = rng.random((6, 9)) < 0.7
    valid[0] = False
    valid[1, 1:] = False
    values[2, :] = 0.5
    valid[2] = True
    out = stats.robust_z(values, valid)
    assert np.isnan(out["center"][0]) and np.isnan(out["z"][0]).all()
    for i in range(1, 6):
        row = values[i, valid[i]]
        np.testing.assert_allclose(out["z"][i, valid[i]], oracle_z(row), rtol=1e-12, atol=1e-12)
        assert np.isnan(out["z"][i, ~valid[i]]).all()
        assert out["center"][i] == pytest.approx(np.median(row))


def test_key_figures_of_a_ranks_summary() -> None:
    seconds = {r: np.full(5, 0.1 * (3 if r == 5 else 1)) for r in range(8)}
    figures = {f.label: f for f in key_figures(run_ranks(seconds))}
    assert figures["ranks"].value == 8 and figures["stragglers"].value == 1
    assert (
        figures["slowest"].value == pytest.approx(0.3) and figures["slowest"].text() == "300.0 ms"
    )
    assert figures["p50"].value == pytest.approx(0.1)


def test_a_simulated_distributed_run_names_its_slow_rank() -> None:
    """TrainingJob(ranks=8, slow_rank=5) sends one ranked batch_time per rank and step; through
    the monitor its ranks summary has 8 ranks and stragglers == [5]. ranks=0 keeps the plain
    job's events exactly (same seed, same documents)."""
    from metricsd.simulate import TrainingJob

    job = TrainingJob("d", np.random.default_rng(1), steps=300, ranks=8, slow_rank=5)
    monitor = Monitor(MonitorSettings(window=200, time_windows=()))
    for step in range(300):
        docs = [d for d in job.events(1000.0 + step) if d["type"] == "batch_time"]
        assert [d["rank"] for d in docs] == list(range(8))
        monitor.ingest([ev(**d) for d in docs], now=1000.0 + step)
    m = ranks_records(monitor.due(2000.0))["d"]["metrics"]
    assert m["ranks"] == 8 and m["stragglers"] == [5]
    jobs = [TrainingJob("p", np.random.default_rng(2), steps=60, **kw) for kw in ({}, {"ranks": 0})]
    plain, again = ([d for t in range(60) for d in j.events(5.0 + t)] for j in jobs)
    assert plain == again and len(plain) > 60 and all("rank" not in d for d in plain)


def test_the_schema_holds_a_ranks_summary_to_its_metrics_object() -> None:
    """A ranks record without stragglers, with a time window or a listed rank lacking its z is
    invalid: the schema checks the ranks metrics, not just any metrics object."""
    rec = orjson.loads(encode(run_ranks({r: np.full(3, 0.1 + r) for r in range(3)})))
    VALIDATOR.validate(rec)
    bad_metrics = {k: v for k, v in rec["metrics"].items() if k != "stragglers"}
    slowest = [{k: v for k, v in s.items() if k != "z"} for s in rec["metrics"]["slowest"]]
    for bad in (
        {**rec, "metrics": bad_metrics},
        {**rec, "window": {"kind": "time", "seconds": 60.0, "truncated": False}},
        {**rec, "metrics": {**rec["metrics"], "slowest": slowest}},
    ):
        assert not VALIDATOR.is_valid(bad)


def test_the_simulators_first_run_slot_is_distributed_the_others_not() -> None:
    """metricsd simulate (and so metricsd dev) sends ranks for its first run slot only: 4 ranks,
    rank 2 three times slower; the other slots' batch_time events carry no rank."""
    from metricsd.config import SimulateSettings
    from metricsd.simulate import SIMULATED_RANKS, SIMULATED_SLOW_RANK, _job

    rng = np.random.default_rng(0)
    jobs = [_job(SimulateSettings(), slot, slot, rng) for slot in range(3)]
    ranks = [[e.get("rank") for e in job.events(1.0) if e["type"] == "batch_time"] for job in jobs]
    assert ranks == [list(range(SIMULATED_RANKS)), [None], [None]]
    assert (jobs[0].ranks, jobs[0].slow_rank) == (4, SIMULATED_SLOW_RANK) == (4, 2)


@settings(max_examples=60, deadline=None)
@given(
    per_rank=st.dictionaries(
        st.integers(0, 40),
        st.lists(
            st.sampled_from([0.0, 0.1, 0.25, 1.0]) | st.floats(0, 10), min_size=1, max_size=12
        ),
        min_size=1,
        max_size=24,
    ),
    window=st.integers(1, 8),
)
def test_any_ranks_summary_matches_numpy(per_rank: dict[int, list[float]], window: int) -> None:
    """For any ranks and step times (ties and MAD 0 frequent), the ranks summary's per-rank
    counts, medians and p95 over each rank's newest ``window`` values, its z-scores, top-16
    order and stragglers equal numpy's."""
    seconds = {r: np.array(v) for r, v in per_rank.items()}
    got = run_ranks(seconds, window=window)["metrics"]
    kept = {r: v[-window:] for r, v in seconds.items()}
    medians = np.array([np.median(v) for v in kept.values()])
    z = dict(zip(kept, oracle_z(medians), strict=True))
    order = sorted(kept, key=lambda r: (-np.median(kept[r]), list(kept).index(r)))
    assert got["ranks"] == len(kept) and got["count"] == sum(len(v) for v in kept.values())
    assert [s["rank"] for s in got["slowest"]] == order[:TOP_RANKS]
    for s in got["slowest"]:
        v = kept[s["rank"]]
        assert s["count"] == len(v)
        assert s["median"] == pytest.approx(np.median(v), rel=1e-12, abs=1e-12)
        assert s["p95"] == pytest.approx(np.percentile(v, 95), rel=1e-12, abs=1e-12)
        assert s["z"] == pytest.approx(z[s["rank"]], rel=1e-9, abs=1e-9)
    slow = [r for r in order if z[r] > STRAGGLER_Z]
    assert got["stragglers"] == slow[:TOP_RANKS] and got["straggler_count"] == len(slow)


def test_ranks_ids_name_one_life_of_the_run() -> None:
    """The ranks summary's id carries the group and the incarnation of the run's oldest rank row,
    like every other stream's: a run back after run_end gets ids disjoint from its first life,
    and the final summary of the first life covers only that life's ranks."""
    monitor = Monitor(MonitorSettings(window=10, time_windows=()), group="g")
    offsets = iter(range(1_000))

    def send(run: str, ranks: range, now: float) -> None:
        events = [BatchTime(run, now, None, 0.01 * (r + 1), rank=r) for r in ranks]
        monitor.ingest(events, now, 0, [next(offsets) for _ in events])  # partition 0

    send("a", range(3), 1.0)
    first = ranks_records(monitor.due(2.0))["a"]
    monitor.end_run("a", 2.5)
    send("a", range(2), 3.0)  # the second life, before the tick that publishes the first's final
    records = [r for r in monitor.due(4.0) if r["stream"] == "ranks"]
    final = [r for r in records if r["final"]]
    live = [r for r in records if not r["final"]]
    assert first["id"].startswith("g|a|ranks|0:0|") and first["group"] == "g"
    assert [r["metrics"]["ranks"] for r in final] == [3]
    assert final[0]["incarnation"] == "0:0"
    assert [r["metrics"]["ranks"] for r in live] == [2]
    assert live[0]["incarnation"] == "0:3"
    assert len({first["id"], final[0]["id"], live[0]["id"]}) == 3
