"""The daemon as a real child process, with its JSON log lines readable by tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LogLine = dict[str, Any]


class DaemonProcess:
    """``python -m metricsd.cli run ...`` with stderr (JSON logs) in a file; stopped by PID."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        assert self.proc is None, "already started"
        env = {k: v for k, v in os.environ.items() if not k.startswith("METRICSD_")}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                # No HTTP port unless a test asks for one (``--http-port`` in ``args`` wins):
                # several daemons at once must not all bind the default 9464.
                [
                    *(sys.executable, "-m", "metricsd.cli", "run", "--log-format", "json"),
                    *("--http-port", "0", *self.args),
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def logs(self) -> list[LogLine]:
        lines = []
        for raw in self.log_path.read_bytes().splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                lines.append({"event": "_unparsed", "text": raw.decode(errors="replace")})
        return lines

    def wait_for_log(self, predicate: Callable[[LogLine], bool], timeout: float = 30.0) -> LogLine:
        """The first log line matching ``predicate``; fails with the log tail on timeout or exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.logs():
                if predicate(line):
                    return line
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no matching log line; tail:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def daemon_on(
    bootstrap: str, topic: str, log_path: Path, *extra: str, partitions: int = 1
) -> DaemonProcess:
    """The daemon for ``topic`` with the tests' usual names: output ``<topic>.out``, group
    ``<topic>-group``; ``extra`` flags follow (e.g. ``--window``, ``--interval``)."""
    return DaemonProcess(
        ["--bootstrap-servers", bootstrap, "--input-topic", topic, "--output-topic",
         f"{topic}.out", "--group-id", f"{topic}-group", "--partitions", str(partitions),
         *extra],
        log_path,
    )  # fmt: skip
