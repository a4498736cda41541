"""The benchmark suite runs end to end (reduced sizes). A benchmark is not a test: no timing is
asserted here, only that every benchmark produced its figures and every target a value, that the
exactness checks passed, and that a violated exactness check fails the run (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_run_produces_every_figure_and_target(tmp_path: Path) -> None:
    """`python -m bench --quick` exits 0 and writes a result with every benchmark's figures and
    a measured value for every target."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "latest.json").read_text())
    benches = {figure["bench"] for figure in result["figures"]}
    assert {
        "ingest",
        "tick",
        "profiler",
        "latency",
        "memory",
        "emitter",
        "churn",
        "scrape",
        "sustained",
    } <= benches
    assert all(figure["n"] >= 1 for figure in result["figures"])
    missing = [t["name"] for t in result["targets"] if t["value"] is None]
    assert not missing, f"targets without a measurement: {missing}"
    exact = [t for t in result["targets"] if t["correctness"]]
    assert exact and all(t["passed"] for t in exact), exact
    assert (tmp_path / "latest.md").read_text().count("|") > 50


#: The tick benchmark at quick sizes with the oracle it is checked against off by 1e-6 (relative):
#: the same as the daemon's statistics disagreeing with numpy/scipy by that much.
PERTURBED = """
import sys
import bench.tick as tick
from bench.run import main

exact = tick._oracle
tick._oracle = lambda x: {k: v * (1 + 1e-6) for k, v in exact(x).items()}
sys.exit(main(sys.argv[1:]))
"""


def test_violated_exactness_fails_the_benchmark_run(tmp_path: Path) -> None:
    """Results that disagree with the oracle: MISS in the table, EXACTNESS VIOLATED on stderr,
    exit 2 even without --strict."""
    proc = subprocess.run(
        [sys.executable, "-c", PERTURBED, "--quick", "--only", "tick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "EXACTNESS VIOLATED: tick: exact to 1e-9" in proc.stderr
    result = json.loads((tmp_path / "latest.json").read_text())
    exact = [t for t in result["targets"] if t["correctness"]]
    assert exact and not any(t["passed"] for t in exact)
    assert all(1e-7 < t["value"] < 1e-5 for t in exact), exact
    assert "MISS" in (tmp_path / "latest.md").read_text()
