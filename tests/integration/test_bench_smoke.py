"""The benchmark suite runs end to end (reduced sizes). A benchmark is not a test: no timing is
asserted here, only that every benchmark produced its figures and every target a value."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_run_produces_every_figure_and_target(tmp_path: Path) -> None:
    """`python -m bench --quick` exits 0 and writes a result with all five benchmarks' figures and
    a measured value for every target."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "latest.json").read_text())
    benches = {figure["bench"] for figure in result["figures"]}
    assert {"ingest", "tick", "profiler", "latency", "memory"} <= benches
    assert all(figure["n"] >= 1 for figure in result["figures"])
    missing = [t["name"] for t in result["targets"] if t["value"] is None]
    assert not missing, f"targets without a measurement: {missing}"
    assert (tmp_path / "latest.md").read_text().count("|") > 50
