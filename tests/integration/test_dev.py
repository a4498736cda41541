"""The zero-setup demo (`metricsd dev`) as a user runs it: every stream shows up, then it stops."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[2]


def readme_training_example() -> str:
    """The first python block of README.md's "From your training loop" section, verbatim."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## From your training loop") :]
    match = re.search(r"^```python\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    assert match is not None, "no python block in the README's training-loop section"
    return match.group(1)


class Lines:
    """A child's stdout collected line by line in a thread, for waiting on what it printed."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._proc = proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self._err: list[str] = []  # drained from the start, so a full pipe never blocks the child
        self._err_thread = threading.Thread(target=self._read_err, daemon=True)
        self._err_thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line)

    def _read_err(self) -> None:
        if self._proc.stderr is not None:
            self._err.extend(self._proc.stderr)

    def wait(self, timeout: float) -> str:
        """Wait for the child to exit; its whole stderr. (Not ``communicate``, which would also
        read stdout and race this reader for the last lines.)"""
        self._proc.wait(timeout)
        self._err_thread.join(10)
        self.join()
        return "".join(self._err)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if found := re.search(pattern, line):
                    return found
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not printed in {timeout} s:\n{self.text[-3000:]}")

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def join(self) -> None:
        self._thread.join(10)


def test_dev_train_runs_a_real_loop_and_the_readme_example_shows_up(tmp_path: Path) -> None:
    """`metricsd dev --train`, as a user runs it: torch runs trained through the Emitter show
    their step-time, loss, learning-rate, validation and emitter/dropped summaries (final ones
    for completed runs), and it exits 0. Meanwhile the README's training-loop example, taken
    literally from README.md and run as a separate script (isolated mode, another directory,
    only METRICSD_BOOTSTRAP_SERVERS pointing at the address dev printed), shows up in dev's
    output with its step times and its loss over all of its 64 steps."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("METRICSD_BOOTSTRAP_SERVERS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "metricsd.cli", "dev", "--train", "--duration", "12",
         "--interval", "1", "--rate", "400", "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    out = Lines(proc)
    try:
        bootstrap = out.wait_for(r"embedded Tansu broker on (127\.0\.0\.1:\d+)", 30).group(1)
        out.wait_for(r"torch training runs \(metricsd\.Emitter\)", 10)
        script = tmp_path / "example.py"
        script.write_text(readme_training_example(), encoding="utf-8")
        user_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "METRICSD"))}
        example = subprocess.run(
            [sys.executable, "-I", str(script)], cwd=tmp_path, capture_output=True, text=True,
            env={**user_env, "METRICSD_BOOTSTRAP_SERVERS": bootstrap}, timeout=60, check=False,
        )  # fmt: skip
        assert example.returncode == 0, example.stderr[-3000:]
        out.wait_for(r"^\[my-first-run scalar/loss n=64 seq=\d+ FINAL\]", 15)
        stderr = out.wait(timeout=60)
    finally:
        proc.kill()
        out.join()
    assert proc.returncode == 0, stderr[-3000:]
    text = out.text
    ours = set(re.findall(r"^\[my-first-run (\S+) n=64 seq=\d+ FINAL\]", text, flags=re.M))
    assert {"batch_time", "scalar/loss"} <= ours, text[-3000:]
    streams = set(re.findall(r"^\[train-0-\d+ (\S+) n=\d+ seq=\d+", text, flags=re.MULTILINE))
    assert {
        "batch_time",
        "scalar/loss",
        "scalar/learning_rate",
        "prediction/val",
        "scalar/emitter/dropped",
    } <= streams, text[-3000:]
    # 300 steps per run: the first three completed theirs, every step time reached the daemon.
    finals = re.findall(r"^\[train-0-[012] batch_time n=(\d+) seq=\d+ FINAL\]", text, flags=re.M)
    assert finals == ["300"] * 3, text[-3000:]
    dropped = re.findall(r"^\[train-0-\d+ scalar/emitter/dropped .* max=(\S+)", text, flags=re.M)
    assert dropped and set(dropped) == {"0"}, text[-3000:]
    assert "simulated runs" not in text and "[run-" not in text  # no simulator
    assert text.rstrip().endswith("metricsd dev: stopped")
