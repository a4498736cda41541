"""The CI rule "no test may be skipped" (tests/no_skips.py), tried on sample tests by a child."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

SAMPLE = """
import pytest

def test_passes():
    assert True

def test_skips():
    pytest.skip("needs a tool: apt-get install -y some-tool")

@pytest.mark.xfail(reason="known bug")
def test_xfails():
    assert False
"""


def run_pytest(
    tmp_path: Path, source: str, no_skips: str | None
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in ("METRICSD_NO_SKIPS", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    if no_skips is not None:
        env["METRICSD_NO_SKIPS"] = no_skips
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no_skips", "-p", "no:cacheprovider", "-q",
         "test_sample.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("no_skips", [None, "0"])
def test_skips_pass_without_the_variable(tmp_path: Path, no_skips: str | None) -> None:
    """Unset (or 0), a skip and an xfail are fine: exit 0, nothing said."""
    done = run_pytest(tmp_path, SAMPLE, no_skips)
    assert done.returncode == 0, done.stdout
    assert "1 passed, 1 skipped, 1 xfailed" in done.stdout
    assert "METRICSD_NO_SKIPS" not in done.stdout


def test_a_skip_fails_the_run_with_the_variable(tmp_path: Path) -> None:
    """METRICSD_NO_SKIPS=1: exit 1, every skipped and xfailed test listed with its reason."""
    done = run_pytest(tmp_path, SAMPLE, "1")
    assert done.returncode == 1, done.stdout
    assert "METRICSD_NO_SKIPS=1: skipped tests fail the run" in done.stdout
    assert "test_sample.py::test_skips: Skipped: needs a tool: apt-get install -y some-tool" in (
        done.stdout
    )
    assert "test_sample.py::test_xfails: xfail: known bug" in done.stdout
    assert "2 skipped test(s): exit status 1" in done.stdout


def test_no_skip_passes_with_the_variable(tmp_path: Path) -> None:
    """METRICSD_NO_SKIPS=1 and nothing skipped: exit 0; a real failure keeps its own status."""
    assert run_pytest(tmp_path, "def test_ok():\n    pass\n", "1").returncode == 0
    failing = "import pytest\n\ndef test_bad():\n    assert False\n\n"
    failing += "def test_s():\n    pytest.skip('x')\n"
    assert run_pytest(tmp_path, failing, "1").returncode == 1
