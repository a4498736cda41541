"""The HTTP port on the real broker, scraped by a real Prometheus server.

One daemon process (tests/integration/daemon_process.py) with ``--http-port`` on a free port, a
Prometheus (Debian package ``prometheus``) started here with a generated config scraping it every
second, and ``promtool check metrics`` on the page. ``/readyz`` is polled from the moment the
process starts, so the sequence of answers is observed rather than guessed: nothing (not
listening yet), then 503 with a reason, then 200 once the partition is assigned, its state
restored and fetched. A second process then starts on the changelog the first one wrote and
goes through 503 (restoring, fetching) to 200 again.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from daemon_process import DaemonProcess, daemon_on
from kafka_tools import produce_foreign
from metricsd.devbroker import DevBroker
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class ReadyzPoller:
    """Polls ``/readyz`` every 20 ms in a thread; keeps the changes of (status, body)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            answer = get(self.url, timeout=1.0)
            if not self.seen or self.seen[-1] != answer:
                self.seen.append(answer)
            self._stop.wait(0.02)

    def __enter__(self) -> ReadyzPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def statuses(self) -> list[int]:
        """The statuses in order, repeats collapsed."""
        out: list[int] = []
        for status, _ in self.seen:
            if not out or out[-1] != status:
                out.append(status)
        return out


@contextmanager
def prometheus(target: str, tmp_path: Path) -> Iterator[str]:
    """A Prometheus server scraping ``target`` every second; yields its base URL; stopped by PID."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n"
        "scrape_configs:\n  - job_name: metricsd\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: get(f"{url}/-/ready")[0] == 200, 30, "Prometheus to be ready")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def query(url: str, promql: str) -> list[dict[str, Any]]:
    """The instant vector of ``promql`` from Prometheus' HTTP API."""
    status, body = get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert status == 200, body
    data = json.loads(body)["data"]
    assert data["resultType"] == "vector"
    return list(data["result"])


def scrape(base: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, text = get(f"{base}/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


Page = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_until(base: str, predicate: Callable[[Page], bool], what: str) -> Page:
    deadline = time.monotonic() + 10
    while True:
        page = scrape(base)
        if predicate(page):
            return page
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def run_series(page: dict[tuple[str, frozenset[tuple[str, str]]], float], run: str) -> set[str]:
    return {name for name, labels in page if ("run_id", run) in labels}


def bt(run: str, i: int) -> tuple[bytes, bytes, int]:
    doc = {"type": "batch_time", "run_id": run, "ts": 1_000.0 + i, "step": i, "seconds": 0.01 * i}
    return run.encode(), orjson.dumps(doc), 0


@pytest.mark.skipif(
    shutil.which(PROMETHEUS) is None or shutil.which(PROMTOOL) is None,
    reason="needs the Debian package prometheus (prometheus and promtool); .ci/run installs it",
)
def test_prometheus_scrapes_the_daemon_and_readiness_follows_its_state(
    broker: DevBroker, topic_name: str, tmp_path: Path
) -> None:
    """Prometheus sees exactly the events produced; the page passes promtool; /livez is 200;
    /readyz goes 503 -> 200 at start and again on a restart that restores state; a run's series
    vanish after its run_end."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    extra = ("--http-port", str(port), "--http-host", "127.0.0.1", "--interval", "0.5",
             "--window", "50")  # fmt: skip

    def daemon(log_name: str) -> DaemonProcess:
        return daemon_on(broker.bootstrap, topic_name, tmp_path / log_name, *extra)

    first = daemon("first.log")
    with ReadyzPoller(f"{base}/readyz") as poll:
        first.start()
        with prometheus(f"127.0.0.1:{port}", tmp_path) as prom:
            try:
                wait_until(lambda: poll.seen and poll.seen[-1][0] == 200, 60, "/readyz 200")
                assert get(f"{base}/livez") == (200, "ok\n")
                n = 120
                produce_foreign(
                    broker.bootstrap,
                    topic_name,
                    [bt("r1", i) for i in range(n)] + [bt("r2", i) for i in range(n)],
                )
                consumed = 'metricsd_events_consumed_total{type="batch_time"}'
                wait_until(
                    lambda: [float(r["value"][1]) for r in query(prom, consumed)] == [2.0 * n],
                    20,
                    f"Prometheus to see {2 * n} batch_time events",
                )
                page = scrape_until(base, lambda p: bool(run_series(p, "r2")), "r2 series")
                assert (
                    run_series(page, "r1")
                    == run_series(page, "r2")
                    == {
                        "metricsd_run_step_time_seconds",
                        "metricsd_run_steps_per_second",
                        "metricsd_run_last_event_timestamp_seconds",
                    }
                )
                p99 = ("metricsd_run_step_time_seconds", frozenset(
                    {("run_id", "r1"), ("quantile", "0.99")}))  # fmt: skip
                assert page[p99] == pytest.approx(0.01 * (70 + 0.99 * 49))  # newest 50: 70..119
                produce_foreign(
                    broker.bootstrap,
                    topic_name,
                    [(b"r2", orjson.dumps({"type": "run_end", "run_id": "r2"}), 0)],
                )
                page = scrape_until(
                    base, lambda p: not run_series(p, "r2"), "r2's series to vanish after run_end"
                )
                assert run_series(page, "r1")
                assert page[("metricsd_evictions_total", frozenset({("reason", "run_end")}))] == 1
                wait_until(
                    lambda: (
                        not query(prom, 'metricsd_run_steps_per_second{run_id="r2"}')
                        and query(prom, 'metricsd_run_steps_per_second{run_id="r1"}')
                    ),
                    10,
                    "Prometheus to drop r2's series (stale) and keep r1's",
                )
                assert [r["value"][1] for r in query(prom, "metricsd_ready")] == ["1"]
                check = subprocess.run(
                    [PROMTOOL, "check", "metrics"],
                    input=get(f"{base}/metrics")[1],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
                assert check.returncode == 0, check.stdout + check.stderr
            finally:
                assert first.terminate() == 0, first.tail()
        started = poll.statuses()
    # Not listening, then 503 (waiting for the broker / the group / the first fetch), then 200.
    assert started[:3] == [0, 503, 200] or started[:2] == [503, 200], poll.seen
    reasons = [body for status, body in poll.seen if status == 503]
    assert reasons and all(body.endswith("\n") and body.count("\n") == 1 for body in reasons)
    assert phases(poll.seen) == sorted(phases(poll.seen)), poll.seen

    # A changelog long enough that its restore takes a while: junk records (unknown keys, counted
    # corrupt and stepped over) in front of the first daemon's checkpoint... and after it, which
    # the restore reads too, up to its own fence.
    junk = 30_000
    produce_foreign(
        broker.bootstrap,
        f"{topic_name}-group.state",
        [(f"junk|{i}".encode(), b"x" * 200, 0) for i in range(junk)],
    )
    second = daemon("second.log")
    with ReadyzPoller(f"{base}/readyz") as poll, second:
        wait_until(lambda: poll.seen and poll.seen[-1][0] == 200, 60, "/readyz 200 on restart")
        restored = second.wait_for_log(lambda line: line.get("event") == "state_restored")
        page = scrape(base)
        assert restored["rows"] >= 1 and restored["corrupt"] >= junk
        assert page[("metricsd_restore_records_total", frozenset())] >= junk
        assert page[("metricsd_restore_partitions_pending", frozenset())] == 0
        assert second.terminate() == 0, second.tail()
    statuses = [s for s in poll.statuses() if s]
    assert statuses[:2] == [503, 200], poll.seen
    assert "restoring" in " ".join(body for _, body in poll.seen), poll.seen  # it took ~1 s
    assert phases(poll.seen) == sorted(phases(poll.seen)), poll.seen


PHASES = ("starting", "no partitions", "restoring", "no fetch")


def phases(seen: list[tuple[int, str]]) -> list[int]:
    """The start-up phase of each 503 answer (they must come in this order); a failed tick can
    come at any time, "stopping" comes last."""
    return [
        next(i for i, phase in enumerate(PHASES) if body.startswith(phase))
        for status, body in seen
        if status == 503 and not body.startswith(("the last tick", "stopping"))
    ]


def test_readiness_goes_503_when_the_broker_vanishes(tmp_path: Path) -> None:
    """A ready daemon whose broker is killed turns /readyz 503 within a few ticks, saying why,
    while /livez stays 200 (its own broker: the session's is shared)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with DevBroker(log_path=tmp_path / "tansu.log").start() as broker:
        topic = "vanishing"
        daemon = daemon_on(broker.bootstrap, topic, tmp_path / "daemon.log", "--http-port",
                           str(port), "--http-host", "127.0.0.1", "--interval", "0.5")  # fmt: skip
        with daemon:
            produce_foreign(broker.bootstrap, topic, [bt("r", i) for i in range(5)])
            wait_until(lambda: get(f"{base}/readyz")[0] == 200, 60, "/readyz 200")
            broker.kill()
            _, why = wait_until(
                lambda: (r := get(f"{base}/readyz"))[0] == 503 and r, 30, "/readyz 503"
            )
            assert "could not publish or commit" in why, why
            assert get(f"{base}/livez") == (200, "ok\n")
