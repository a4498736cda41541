"""Signals and exit status on the real broker: SIGHUP shuts down cleanly like SIGTERM (final tick,
commit, exit 0); a shutdown whose final tick cannot reach the broker exits 1, not 0."""

from __future__ import annotations

import signal
from pathlib import Path

import orjson
import pytest
from daemon_process import DaemonProcess
from kafka_tools import create_topics, produce_foreign
from metricsd.devbroker import DevBroker, free_port
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


def _records(n: int) -> list[tuple[bytes, bytes, None]]:
    return [
        (b"r", orjson.dumps({"type": "batch_time", "run_id": "r", "seconds": 0.1 * i}), None)
        for i in range(n)
    ]


def _args(bootstrap: str, topic: str, *extra: str) -> list[str]:
    return ["--bootstrap-servers", bootstrap, "--input-topic", topic, "--output-topic",
            f"{topic}.out", "--group-id", f"{topic}-g", "--interval", "3600",
            "--stats-interval", "0.3", "--partitions", "1", *extra]  # fmt: skip


def test_sighup_flushes_commits_and_exits_zero(
    broker: DevBroker, topic_name: str, tmp_path: Path
) -> None:
    create_topics(broker.bootstrap, {topic_name: 1})
    with DaemonProcess(_args(broker.bootstrap, topic_name), tmp_path / "d.log") as daemon:
        produce_foreign(broker.bootstrap, topic_name, _records(20))
        daemon.wait_for_log(lambda ln: ln.get("event") == "stats" and ln["events"] == 20, 60)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        assert daemon.proc.wait(60) == 0
    stopped = next(ln for ln in daemon.logs() if ln.get("event") == "stopped")
    assert stopped["flushed"] is True and stopped["commits"] >= 1 and stopped["summaries"] >= 1


def test_a_shutdown_that_cannot_commit_exits_one(tmp_path: Path) -> None:
    """The broker becomes unreachable, then SIGTERM: the final tick cannot publish or commit, the
    steps give up after --shutdown-timeout, and the exit status is 1 with one clear error."""
    port = free_port()
    broker = DevBroker(advertised=f"127.0.0.1:{port}", log_path=tmp_path / "tansu.log")
    broker.start()
    proxy = TcpProxy(broker.bootstrap, port=port).start()
    try:
        create_topics(proxy.address, {"cut": 1})
        args = _args(proxy.address, "cut", "--shutdown-timeout", "3")
        with DaemonProcess(args, tmp_path / "d.log") as daemon:
            produce_foreign(proxy.address, "cut", _records(20))
            daemon.wait_for_log(lambda ln: ln.get("event") == "stats" and ln["events"] == 20, 60)
            proxy.cut()
            assert daemon.terminate(timeout=90) == 1
        stopped = next(ln for ln in daemon.logs() if ln.get("event") == "stopped")
        assert stopped["flushed"] is False
        text = (tmp_path / "d.log").read_text()
        assert "metricsd: error: the final tick could not publish and commit everything" in text
        assert "Traceback" not in text
    finally:
        proxy.stop()
        broker.stop()
