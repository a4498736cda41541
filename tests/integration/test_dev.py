"""The zero-setup demo (`metricsd dev`) as a user runs it: every stream shows up, then it stops."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_dev_demo_prints_every_stream_and_a_profile_then_exits() -> None:
    """`metricsd dev --duration` starts its own broker, prints summaries of all six stream kinds
    and a profile line, and exits 0 by itself."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "metricsd.cli",
            "dev",
            "--duration",
            "14",
            "--interval",
            "1",
            "--profile-interval",
            "4",
            "--rate",
            "400",
            "--log-format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "embedded Tansu broker on 127.0.0.1:" in out
    streams = set(re.findall(r"^\[\S+ (\S+) n=\d+ seq=\d+", out, flags=re.MULTILINE))
    assert {
        "batch_time",
        "prediction/val",
        "cv",
        "attention",
        "features",
        "scalar/loss",
    } <= streams, out[-3000:]
    assert re.search(r"^\[profile\] ticks=\d+", out, flags=re.MULTILINE), out[-3000:]
    assert out.rstrip().endswith("metricsd dev: stopped")
