"""``metricsd tail`` on the real broker: the live table in a real terminal (tmux), and --json.

The daemon runs as a child process on the embedded broker and summarises what a foreign client
produced; ``python -m metricsd.tail`` reads its output topic without a consumer group. The table
test drives tail inside a detached tmux session of its own (own socket, killed at the end) and
reads the screen with ``capture-pane``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from daemon_process import DaemonProcess
from kafka_tools import create_topics, produce_foreign, read_topic_foreign
from metricsd.devbroker import DevBroker

pytestmark = pytest.mark.integration

PARTITIONS = 2


def _clean_env() -> dict[str, str]:
    """The environment without METRICSD_* (tail's defaults must not come from the caller) and
    without COLUMNS/LINES, which rich prefers to the terminal's size (set in pytest-xdist
    workers, they drew the table 80 columns wide in a wider pane)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("METRICSD_") and k not in ("COLUMNS", "LINES")
    }


@pytest.fixture(scope="module")
def tmux() -> str:
    """The tmux binary; installed with apt-get when missing and root, else the test is skipped."""
    found = shutil.which("tmux")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "tmux"], check=False, timeout=300)
        found = shutil.which("tmux")
    if found is None:
        pytest.skip("tmux is missing: sudo apt-get install -y tmux")
    return found


class Screen:
    """A detached tmux session (own server socket) running one command, 160 x 40."""

    def __init__(self, tmux: str, command: list[str], size: tuple[int, int] = (160, 40)) -> None:
        self.tmux = tmux
        self.socket = f"metricsd-test-{uuid.uuid4().hex[:8]}"
        shell = f"{shlex.join(command)}; echo TAIL_EXIT=$?; sleep 600"
        width, height = (str(n) for n in size)
        self._run("new-session", "-d", "-s", "tail", "-x", width, "-y", height, shell)

    def _run(self, *args: str) -> str:
        done = subprocess.run(
            [self.tmux, "-L", self.socket, *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=_clean_env(),
            check=False,
        )
        assert done.returncode == 0, f"tmux {args[0]} failed: {done.stderr}"
        return done.stdout

    def text(self) -> str:
        return self._run("capture-pane", "-p", "-t", "tail")

    def keys(self, *keys: str) -> None:
        self._run("send-keys", "-t", "tail", *keys)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.text()
            if predicate(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"screen never matched; it shows:\n{screen}")
            time.sleep(0.3)

    def ctrl_c_exits_cleanly(self) -> None:
        """Ctrl-C, as a person would: tail exits 0, with no traceback on the screen."""
        self.keys("C-c")
        final = self.wait_for(lambda s: "TAIL_EXIT=" in s, timeout=30)
        assert "TAIL_EXIT=0" in final, final
        assert "Traceback" not in final and "KeyboardInterrupt" not in final

    def close(self) -> None:
        subprocess.run(
            [self.tmux, "-L", self.socket, "kill-server"],
            capture_output=True,
            timeout=30,
            check=False,
        )


def batch_times(run: str, n: int, *, end: bool = False) -> list[tuple[bytes, bytes, None]]:
    records = [
        (
            run.encode(),
            orjson.dumps(
                {"type": "batch_time", "run_id": run, "step": i, "seconds": 0.1 + 0.001 * i}
            ),
            None,
        )
        for i in range(n)
    ]
    if end:
        records.append((run.encode(), orjson.dumps({"type": "run_end", "run_id": run}), None))
    return records


@pytest.fixture
def daemon(broker: DevBroker, topic_name: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The daemon on ``topic_name`` with a 1 s tick; yields (input topic, output topic)."""
    create_topics(broker.bootstrap, {topic_name: PARTITIONS})
    process = DaemonProcess(
        [
            "--bootstrap-servers",
            broker.bootstrap,
            "--input-topic",
            topic_name,
            "--output-topic",
            f"{topic_name}.out",
            "--group-id",
            f"{topic_name}-group",
            "--partitions",
            str(PARTITIONS),
            "--window",
            "50",
            "--time-window",
            "0",
            "--interval",
            "1",
        ],
        tmp_path / "daemon.log",
    )
    with process:
        process.wait_for_log(lambda line: line.get("event") == "started", timeout=60)
        yield topic_name, f"{topic_name}.out"


def summaries_of(records: list[Any]) -> list[dict[str, Any]]:
    return [r for _, value, _, _ in records if (r := orjson.loads(value))["type"] == "summary"]


def totals_reached(expected: dict[str, int]) -> Callable[[list[Any]], bool]:
    def predicate(records: list[Any]) -> bool:
        best: dict[str, int] = {}
        for r in summaries_of(records):
            best[r["run_id"]] = max(best.get(r["run_id"], 0), r["total"])
        return all(best.get(run, 0) >= n for run, n in expected.items())

    return predicate


def tail_command(broker: DevBroker, topic: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "metricsd.tail",
        "--bootstrap-servers",
        broker.bootstrap,
        "--topic",
        topic,
        *extra,
    ]


def test_live_table_shows_the_runs_updates_in_place_and_ctrl_c_exits_0(
    broker: DevBroker, daemon: tuple[str, str], tmux: str
) -> None:
    """In a terminal, tail draws one row per run and stream with its figures, picks up a new run
    and an ended one while running, and Ctrl-C ends it with exit code 0 and no traceback."""
    source, out = daemon
    produce_foreign(broker.bootstrap, source, batch_times("tail-a", 40) + batch_times("tail-b", 30))
    read_topic_foreign(
        broker.bootstrap, out, range(PARTITIONS), until=totals_reached({"tail-a": 40, "tail-b": 30})
    )
    screen = Screen(tmux, tail_command(broker, out, "--from-beginning"))
    try:
        first = screen.wait_for(lambda s: "tail-a" in s and "tail-b" in s and "p50" in s)
        assert "batch_time" in first and "steps/s" in first and "tail-c" not in first
        assert "40/40" in first and "30/30" in first  # values in the window / ever received
        # More data while tail runs: a new run appears, tail-a ends, the table is redrawn.
        produce_foreign(
            broker.bootstrap, source, batch_times("tail-c", 20) + batch_times("tail-a", 5, end=True)
        )

        def updated(s: str) -> bool:
            row_a = next((line for line in s.splitlines() if "tail-a" in line), "")
            return "tail-c" in s and "ended" in row_a and "45/45" in row_a

        second = screen.wait_for(updated)
        assert second.count("metricsd summaries") == 1, "the table must update in place"
        screen.ctrl_c_exits_cleanly()
    finally:
        screen.close()


def test_live_table_with_the_simulator_running_shows_every_stream_kind(
    broker: DevBroker, daemon: tuple[str, str], tmux: str, tmp_path: Path
) -> None:
    """As a person would run it: the simulator feeding the daemon, tail in a terminal. Rows of
    every stream kind the simulator sends appear with their figures, and Ctrl-C exits 0."""
    source, out = daemon
    log = (tmp_path / "simulate.log").open("wb")
    simulator = subprocess.Popen(
        [sys.executable, "-m", "metricsd.cli", "simulate", "--bootstrap-servers", broker.bootstrap,
         "--input-topic", source, "--partitions", str(PARTITIONS), "--runs", "3", "--rate", "150",
         "--duration", "90", "--seed", "7"],
        stdout=log, stderr=log, env=_clean_env(), start_new_session=True,
    )  # fmt: skip
    # One run (the simulator's first, distributed, sends every kind) on a tall terminal: its
    # rows wrap their key figures one per line, and rich cuts a table taller than the screen.
    screen = Screen(tmux, tail_command(broker, out, "--from-beginning", "--run", "run-7-0"),
                    size=(200, 200))  # fmt: skip
    kinds = ("batch_time", "prediction/", "scalar/loss", "cv", "attention", "features", "ranks")
    try:
        full = screen.wait_for(lambda s: all(k in s for k in kinds), timeout=60)
        assert "p50" in full and "steps/s" in full and "live" in full
        screen.ctrl_c_exits_cleanly()
    finally:
        screen.close()
        os.killpg(simulator.pid, signal.SIGKILL)
        simulator.wait(10)
        log.close()


def test_json_prints_each_summary_once_even_when_published_twice(
    broker: DevBroker, daemon: tuple[str, str]
) -> None:
    """--json de-duplicates on id: a summary published a second time (at-least-once delivery)
    is printed once; SIGINT ends tail with exit code 0."""
    source, out = daemon
    produce_foreign(broker.bootstrap, source, batch_times("json-a", 25) + batch_times("json-b", 15))
    published = read_topic_foreign(
        broker.bootstrap, out, range(PARTITIONS), until=totals_reached({"json-a": 25, "json-b": 15})
    )
    originals = summaries_of(published)
    duplicate = next(r for r in originals if r["run_id"] == "json-a")
    # The duplicate (same bytes, same key: same partition), then a sentinel after it: once tail
    # printed the sentinel, it has read the duplicate too.
    sentinel = {**duplicate, "seq": 10_000, "id": duplicate["id"].rsplit("|", 1)[0] + "|10000"}
    key = duplicate["run_id"].encode()
    produce_foreign(
        broker.bootstrap,
        out,
        [(key, orjson.dumps(duplicate), None), (key, orjson.dumps(sentinel), None)],
    )
    proc = subprocess.Popen(
        [*tail_command(broker, out, "--from-beginning", "--json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_clean_env(),
        start_new_session=True,
    )
    lines: list[bytes] = []
    got_sentinel = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if orjson.loads(line)["id"] == sentinel["id"]:
                got_sentinel.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        assert got_sentinel.wait(60), f"sentinel never printed; stderr: {proc.stderr}"
        time.sleep(1.0)  # anything else the daemon publishes meanwhile may come too
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    thread.join(10)
    printed = [orjson.loads(line) for line in lines]
    ids = [r["id"] for r in printed]
    assert len(ids) == len(set(ids)), "a summary id was printed twice"
    assert ids.count(duplicate["id"]) == 1
    assert {r["id"] for r in originals} <= set(ids)
    assert next(r for r in printed if r["id"] == duplicate["id"]) == duplicate
    assert proc.stderr is not None and b"Traceback" not in proc.stderr.read()


def test_report_reads_the_run_from_the_topic(
    broker: DevBroker, daemon: tuple[str, str], tmp_path: Path
) -> None:
    """Without --input, report reads the topic from its start up to the end it had then, while
    the topic stays busy (a daemon still publishing), and draws the run's batch-time figures (and
    nothing for the streams it does not have)."""
    source, out = daemon
    produce_foreign(broker.bootstrap, source, batch_times("rep-a", 60) + batch_times("rep-b", 10))
    published = read_topic_foreign(
        broker.bootstrap, out, range(PARTITIONS), until=totals_reached({"rep-a": 60, "rep-b": 10})
    )
    # Copies of one published summary every 50 ms while the report reads: the topic never goes
    # quiet for --idle (30 s). Before, the report waited for that, so it never returned while a
    # daemon was publishing (seen against `metricsd dev`: 13 minutes, until dev stopped).
    key, value, partition, _ = published[-1]
    stop = threading.Event()

    def keep_publishing() -> None:
        while not stop.wait(0.05):
            produce_foreign(broker.bootstrap, out, [(key, value or b"", partition)])

    writer = threading.Thread(target=keep_publishing, daemon=True)
    writer.start()
    target = tmp_path / "report"
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "metricsd.report", "--run", "rep-a",
             "--bootstrap-servers", broker.bootstrap, "--topic", out, "--out", str(target),
             "--idle", "30"],
            capture_output=True, text=True, timeout=120, env=_clean_env(), check=False,
        )  # fmt: skip
    finally:
        stop.set()
        writer.join(30)
    assert time.monotonic() - started < 25, "the report waited for a busy topic to go quiet"
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in target.iterdir()) == [
        "index.html",
        "step_time.png",
        "step_time_distribution.png",
        "throughput.png",
    ]
    page = (target / "index.html").read_text()
    assert "Run rep-a" in page and "<td>60</td>" in page  # batches seen
